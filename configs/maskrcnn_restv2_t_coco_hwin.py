# ResTv2-T Mask R-CNN (COCO 1x) with window attention in all but the last block of each
# stage, which attends globally. Windows 64/32/16/8.
# Paper Table 3 (V100): 135.9 ms/iter, 45.02 box AP, 41.56 mask AP (global: 79.9 ms,
# 46.13 / 42.03).
_base_ = './maskrcnn_restv2_t_coco.py'

model = dict(backbone=dict(attn_style='hwin', window_size=(64, 32, 16, 8)))

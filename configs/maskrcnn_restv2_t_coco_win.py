# ResTv2-T Mask R-CNN (COCO 1x) with window attention in every block: windows of
# 64/32/16/8 tokens per stage, 8 x 8 cells of each stage's reduced map.
# Paper Table 3 (V100): 149.6 ms/iter, 43.95 box AP, 40.42 mask AP (global: 79.9 ms,
# 46.13 / 42.03).
_base_ = './maskrcnn_restv2_t_coco.py'

model = dict(backbone=dict(attn_style='win', window_size=(64, 32, 16, 8)))

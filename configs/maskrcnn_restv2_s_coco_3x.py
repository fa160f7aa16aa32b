# Mask R-CNN + FPN with ResTv2-S, COCO 3x multi-scale, as the ResTv2-T 3x config.
# Paper Table 4 (3x, multi-scale): 48.1 box AP, 43.3 mask AP.
_base_ = './maskrcnn_restv2_t_coco_3x.py'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint='checkpoints/restv2_small_224.pth')))

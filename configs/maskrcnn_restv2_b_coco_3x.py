# Mask R-CNN + FPN with ResTv2-B, COCO 3x multi-scale, as the ResTv2-T 3x config.
# Paper Table 4 (3x, multi-scale): 48.7 box AP, 43.9 mask AP.
_base_ = './maskrcnn_restv2_t_coco_3x.py'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint='checkpoints/restv2_base_224.pth')))

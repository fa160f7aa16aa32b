# Mask R-CNN + FPN with ResTv2-S, COCO 1x: as the ResTv2-T config, bigger backbone.
# Paper Table 4: 60.7M parameters, 290 GFLOPs at 1280 x 800.
_base_ = './maskrcnn_restv2_t_coco.py'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint='checkpoints/restv2_small_224.pth')))

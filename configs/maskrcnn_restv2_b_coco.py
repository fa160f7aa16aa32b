# Mask R-CNN + FPN with ResTv2-B, COCO 1x: as the ResTv2-T config, bigger backbone.
# Paper Table 4: 75.5M parameters, 328 GFLOPs at 1280 x 800.
_base_ = './maskrcnn_restv2_t_coco.py'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint='checkpoints/restv2_base_224.pth')))

# UperNet with ResTv2-B on ADE20K, as the ResTv2-T config with a bigger backbone.
# Paper Table 5: 87.6M parameters, 1095 GFLOPs at 2048 x 512, 49.6 mIoU (multi-scale).
_base_ = './upernet_restv2_t_ade20k.py'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint='checkpoints/restv2_base_224.pth')))

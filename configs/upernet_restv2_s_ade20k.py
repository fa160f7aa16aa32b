# UperNet with ResTv2-S on ADE20K, as the ResTv2-T config with a bigger backbone.
# Paper Table 5: 72.9M parameters, 1035 GFLOPs at 2048 x 512, 49.2 mIoU (multi-scale).
_base_ = './upernet_restv2_t_ade20k.py'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint='checkpoints/restv2_small_224.pth')))

"""The optimizer constructor of the configs: few parameter groups, the same updates."""
import copy

import pytest
import torch
from mmengine.optim import build_optim_wrapper

import restv2_mm  # noqa: F401  (registers the constructor)
from restv2_mm import ResTv2
from restv2_mm.engine import merge_param_groups


def toy_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module('backbone', ResTv2('tiny', drop_path_rate=0.1))
    model.add_module('head', torch.nn.Conv2d(768, 4, 1))
    model.backbone.init_weights()
    return model


def optim_cfg(constructor=None):
    cfg = dict(type='OptimWrapper',
               optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
               paramwise_cfg=dict(norm_decay_mult=0., bias_decay_mult=0.,
                                  custom_keys={'head': dict(lr_mult=10.)}))
    if constructor:
        cfg['constructor'] = constructor
    return cfg


def train(model, optim_wrapper, steps=3):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.rand(2, 3, 64, 96)
        loss = model.head(model.backbone(x)[-1]).pow(2).mean()
        optim_wrapper.update_params(loss)


def test_merged_groups_give_the_same_parameters_as_mmengines_default():
    default_model, merged_model = toy_model(), toy_model()
    default = build_optim_wrapper(default_model, optim_cfg())
    merged = build_optim_wrapper(merged_model,
                                 optim_cfg('MergedGroupsOptimWrapperConstructor'))
    n_params = len([p for p in default_model.parameters() if p.requires_grad])
    assert len(default.optimizer.param_groups) == n_params  # one group per tensor
    # decay and no decay in the backbone; the head's custom key (10x lr) overrides both
    assert len(merged.optimizer.param_groups) == 3
    train(default_model, default)
    train(merged_model, merged)
    for (name, a), b in zip(default_model.named_parameters(), merged_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_merging_keeps_each_setting_and_the_order_of_parameters():
    a, b, c, d = (torch.nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = [dict(params=[a], lr=1.), dict(params=[b], lr=1., weight_decay=0.),
              dict(params=[c], lr=1.), dict(params=[d], lr=1., weight_decay=0.,
                                            betas=(0.9, 0.99))]
    merged = merge_param_groups(copy.copy(groups))
    assert [g['params'] for g in merged] == [[a, c], [b], [d]]
    assert merged[0]['lr'] == 1. and 'weight_decay' not in merged[0]
    assert merged[2]['betas'] == (0.9, 0.99)


@pytest.mark.parametrize('config', ['configs/maskrcnn_restv2_t_coco.py',
                                    'configs/upernet_restv2_t_ade20k.py'])
def test_the_configs_train_with_a_few_groups(config):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from restv2_mm.utils.tool import build_model
    cfg = Config.fromfile(config)
    cfg.optim_wrapper.type = 'OptimWrapper'  # AMP needs a GPU; the groups are the same
    model = build_model(cfg)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        groups = build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
    assert len(groups) == 2  # weight decay, and none on norms and biases
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    decays = sorted(g['weight_decay'] for g in groups)
    assert decays == [0., cfg.optim_wrapper.optimizer.weight_decay]

"""A hook for the distributed tests: each rank writes down what it trained on and where its
parameters ended, to ``out_dir/rank<r>.json``.

Imported by the processes of a run through the test config's ``custom_imports``.
"""
import hashlib
import json
import os
import os.path as osp

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


def parameter_digest(named_tensors) -> str:
    """SHA-1 of tensors by name, in name order."""
    sha = hashlib.sha1()
    for name, tensor in sorted(named_tensors):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


@HOOKS.register_module()
class RankProbeHook(Hook):
    priority = 'LOWEST'

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.images = {}  # epoch -> image file names, in the order this rank saw them

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        seen = self.images.setdefault(str(runner.epoch), [])
        seen += [osp.basename(sample.img_path) for sample in data_batch['data_samples']]

    def after_run(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        params = list(model.named_parameters())
        # how many training passes the backbone recorded as CUDA graphs (fast_training)
        graphs = getattr(getattr(model, 'backbone', None), '_train_graphs', None)
        record = dict(rank=runner.rank, world_size=runner.world_size, images=self.images,
                      parameter_names=[name for name, _ in params],
                      parameters=parameter_digest(params),
                      training_graphs=None if graphs is None else graphs.captures)
        os.makedirs(self.out_dir, exist_ok=True)
        with open(osp.join(self.out_dir, f'rank{runner.rank}.json'), 'w') as f:
            json.dump(record, f)

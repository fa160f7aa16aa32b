"""Inside each process of a distributed run (``--launcher pytorch|slurm|mpi``), before and
after the Runner is built.

With CUDA nothing is changed: mmengine initialises NCCL and each process takes its own GPU.
Without CUDA, mmengine's set-up would select a CUDA device and its DDP wrapper would pass
device ids, so here the processes join through gloo and the model is wrapped by
:class:`CPUDistributedDataParallel` instead. The same mmengine loops, samplers, result
collection and rank-0-only checkpoints and logs then run as on GPUs.
"""
import datetime
import logging
import os

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS

from .tool import ToolError

TORCHRUN_VARIABLES = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
DDP_TYPES = ('MMDistributedDataParallel', 'mmengine.MMDistributedDataParallel')


def _sync_bn_layers(module: nn.Module) -> int:
    # torch's nn.SyncBatchNorm and mmcv's ops.SyncBatchNorm share the class name
    return sum(type(m).__name__ == 'SyncBatchNorm' for m in module.modules())


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's :class:`MMDistributedDataParallel` for a model on the CPU.

    DDP takes no device ids for CPU modules, so ``device_ids`` (which the Runner fills with
    the local rank) is ignored. SyncBN has no CPU kernel: its layers become BatchNorm, as
    the Runner does for one process, with one warning.
    """

    def __init__(self, module: nn.Module, device_ids=None, **kwargs):
        num_sync_bn = _sync_bn_layers(module)
        if num_sync_bn:
            module = revert_sync_batchnorm(module)
            print_log(
                f'SyncBN has no CPU implementation: the model\'s {num_sync_bn} SyncBatchNorm '
                f'layers were turned into BatchNorm, so each process normalises with the '
                f'statistics of its own images.', logger='current', level=logging.WARNING)
        super().__init__(module=module, device_ids=None, **kwargs)


def _check_torchrun_environment(launcher: str) -> None:
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if launcher == 'pytorch' and missing:
        raise ToolError(
            f'--launcher pytorch expects the variables torchrun sets for each process '
            f'({", ".join(missing)} missing). Start several processes with '
            f'`bash tools/dist_train.sh CONFIG N` or `bash tools/dist_test.sh CONFIG CKPT N`; '
            f'for one process leave out --launcher.')


def _check_gpu_per_process() -> None:
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', 0))
    gpus = torch.cuda.device_count()
    if local_processes > gpus:
        raise ToolError(
            f'{local_processes} processes were started on this machine but it has {gpus} '
            f'GPU(s) visible (CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES")}); '
            f'each process needs a GPU of its own: start at most {gpus}.')


def _cpu_wrapper_cfg(cfg) -> dict:
    """``model_wrapper_cfg`` for the CPU: the config's DDP options on the CPU wrapper."""
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        return dict(type='CPUDistributedDataParallel', broadcast_buffers=False,
                    find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper_type = wrapper.get('type', 'MMDistributedDataParallel')
    if wrapper_type not in DDP_TYPES:
        raise ToolError(
            f'model_wrapper_cfg.type={wrapper_type!r} cannot run on the CPU; distributed '
            f'runs without CUDA support MMDistributedDataParallel only (leave '
            f'model_wrapper_cfg out, or use GPUs).')
    return dict(wrapper, type='CPUDistributedDataParallel')


def setup_distributed(cfg) -> None:
    """Prepare this process for the distributed run that ``cfg.launcher`` names.

    On CUDA machines this only checks the launch (mmengine does the rest: NCCL, one GPU per
    process). Without CUDA it joins the process group with gloo, with the timeout of
    ``env_cfg.dist_cfg`` if the config sets one, and wraps the model for the CPU. Problems
    with the launch are :class:`ToolError`.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none':
        return
    _check_torchrun_environment(launcher)
    if torch.cuda.is_available():
        if launcher == 'pytorch':
            _check_gpu_per_process()
        return
    if launcher != 'pytorch':
        raise ToolError(
            f'--launcher {launcher} runs one process per GPU and no GPU is visible. On the '
            f'CPU, start the processes with torchrun: `bash tools/dist_train.sh CONFIG N` '
            f'(--launcher pytorch).')
    cfg.model_wrapper_cfg = _cpu_wrapper_cfg(cfg)
    if not torch_dist.is_initialized():
        timeout = ((cfg.get('env_cfg') or {}).get('dist_cfg') or {}).get('timeout')
        kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
        torch_dist.init_process_group(backend='gloo', **kwargs)


def log_distributed(runner) -> None:
    """One line in the run's log saying how its processes work together."""
    if not runner.distributed:
        return
    backend = torch_dist.get_backend()
    where = 'one GPU per process' if torch.cuda.is_available() else 'processes on the CPU'
    runner.logger.info(f'Distributed: world size {runner.world_size}, {backend} backend, '
                       f'{where}.')

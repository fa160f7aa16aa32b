"""Distributed training and testing with two processes on the CPU (gloo), through
tools/dist_train.sh and tools/dist_test.sh, and the launch checks that stop a bad launch
with one line.

The end-to-end runs use the toy models on 4 training and 3 validation images of 64 px (an
odd count, so that one rank gets a padded share); each rank of the Mask R-CNN run writes
what it trained on and its final parameters through ``rank_probe.RankProbeHook``.
"""
import json
import os
import os.path as osp
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from mmengine.config import Config

from rank_probe import parameter_digest
from restv2_mm.checkpoint import read_checkpoint
from restv2_mm.utils import dist as dist_utils
from restv2_mm.utils import launch
from restv2_mm.utils.tool import ToolError
from test_downstream import (DET_TOY, ROOT, SEG_TOY, TIMEOUT,
                             _checkpoint_is_weights_only_loadable, assert_ok,
                             last_checkpoint_iter, resume_options, run_tool, toy_workdir,
                             wait_for_first_checkpoint)

HERE = osp.dirname(osp.abspath(__file__))
TRAIN_IMAGES = [f'{i:012d}.jpg' for i in range(1, 5)]
SYNC_BN_WARNING = 'SyncBN has no CPU implementation'
TWO_ON_CPU = 'Distributed: world size 2, gloo backend, processes on the CPU.'


def dist_env(**extra):
    # rank_probe is importable in the processes, and whatever the environment adds too
    path = os.pathsep.join(filter(None, [HERE, os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, PYTHONWARNINGS='ignore', PYTHON=sys.executable, PYTHONPATH=path,
               **extra)
    if 'PORT' not in extra:
        env.pop('PORT', None)
    return env


def run_dist(script, args, cwd, timeout=TIMEOUT, **extra_env):
    return subprocess.run(['bash', osp.join(ROOT, 'tools', script), *args], cwd=cwd,
                          env=dist_env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def child_pids(pid):
    children = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != 'Z':
            children.append(int(entry))
    return children


def crash(launcher):
    """SIGKILL a dist_*.sh run as a crash would: the launcher, and each worker with its data
    loaders (torchrun starts every worker in a session of its own, which a SIGKILL of the
    launcher alone would leave running). Returns the workers' pids, checked to be gone."""
    workers = child_pids(launcher.pid)
    launcher.kill()
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)
    launcher.wait(30)
    deadline = time.time() + 30
    while any(osp.exists(f'/proc/{pid}') and not zombie(pid) for pid in workers):
        assert time.time() < deadline, 'a worker outlived SIGKILL'
        time.sleep(0.05)
    return workers


def zombie(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


def the_log(work):
    """The text of the run's log file: one timestamp folder with one .log file in it."""
    (run_dir,) = [p for p in work.iterdir() if p.is_dir()]
    (log,) = run_dir.glob('*.log')
    return log.read_text()


@pytest.fixture(scope='module')
def dist_cwd(tmp_path_factory):
    return toy_workdir(tmp_path_factory, 'dist_run', num_val=3)  # odd: ranks get unequal shares


def probe_config(cwd, base: str, name: str):
    """A config at ``cwd/name`` that is ``base`` with ``RankProbeHook`` writing to
    ``cwd/probe``; returns the config and that folder."""
    probe_dir = cwd / 'probe'
    config = cwd / name
    config.write_text(
        f'_base_ = [{base!r}]\n'
        f"custom_imports = dict(imports=['restv2_mm', 'rank_probe'], "
        f'allow_failed_imports=False)\n'
        f"custom_hooks = [dict(type='RankProbeHook', out_dir={str(probe_dir)!r})]\n")
    return config, probe_dir


@pytest.fixture(scope='module')
def maskrcnn_run(dist_cwd):
    """One epoch of the toy Mask R-CNN on two processes, one image each per iteration."""
    config, probe_dir = probe_config(dist_cwd, DET_TOY, 'maskrcnn_probe.py')
    work = dist_cwd / 'work_det'
    proc = run_dist('dist_train.sh', [str(config), '2', '--work-dir', str(work),
                                      '--cfg-options', 'train_cfg.max_epochs=1',
                                      'train_dataloader.batch_size=1',
                                      'default_hooks.logger.interval=1'], cwd=dist_cwd)
    return proc, work, probe_dir


@pytest.mark.slow
def test_two_processes_train_maskrcnn_in_step_and_only_rank_0_writes(maskrcnn_run):
    proc, work, probe_dir = maskrcnn_run
    assert_ok(proc)
    output = proc.stdout + proc.stderr
    log = the_log(work)
    assert TWO_ON_CPU in log
    # 4 images, 2 processes, 1 image each: 2 iterations an epoch, each logged once
    for text in (output, log):
        assert text.count('Epoch(train) [1][2/2]') == 1
        assert 'Epoch(train) [1][3/' not in text
    assert 'coco/bbox_mAP' in log  # validated, results gathered from both ranks

    ranks = [json.loads((probe_dir / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert [(p['rank'], p['world_size']) for p in ranks] == [(0, 2), (1, 2)]
    # each rank trained on its own half of the epoch's images
    seen = [set(p['images']['0']) for p in ranks]
    assert [len(p['images']['0']) for p in ranks] == [2, 2]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(TRAIN_IMAGES)
    # the gradients were averaged: both ranks end with the same parameters ...
    assert ranks[0]['parameters'] == ranks[1]['parameters']
    # ... which are those of the checkpoint, written once, by rank 0, with one log
    checkpoint = read_checkpoint(str(work / 'epoch_1.pth'))
    state = checkpoint['state_dict']
    names = ranks[0]['parameter_names']
    assert parameter_digest((n, state[n]) for n in names) == ranks[0]['parameters']
    run_dir = [p.name for p in work.iterdir() if p.is_dir()]
    assert sorted(os.listdir(work)) == sorted(
        run_dir + ['epoch_1.pth', 'last_checkpoint', 'maskrcnn_probe.py'])
    assert sorted(os.listdir(work / run_dir[0])) == [f'{run_dir[0]}.log', 'vis_data']


@pytest.mark.slow
def test_dist_test_gives_exactly_the_ap_of_one_process_on_an_odd_image_count(
        maskrcnn_run, dist_cwd, monkeypatch):
    _, work, _ = maskrcnn_run
    # one thread, as torchrun gives each of the two processes: the same sums, bit for bit
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    checkpoint = str(work / 'epoch_1.pth')
    # every box kept, so that the untrained model's AP is not zero
    options = ['--cfg-options', 'test_dataloader.batch_size=1',
               'model.test_cfg.rcnn.score_thr=0.0', 'model.test_cfg.rcnn.max_per_img=100']
    results = {}
    for name in ('one', 'two'):
        out = dist_cwd / f'test_{name}'
        args = ['--work-dir', str(out), '--out', str(out / 'predictions.pkl'), *options]
        if name == 'one':
            proc = run_tool('test.py', [DET_TOY, checkpoint, *args], cwd=dist_cwd)
        else:
            proc = run_dist('dist_test.sh', [DET_TOY, checkpoint, '2', *args], cwd=dist_cwd)
        assert_ok(proc)
        metrics = json.loads((out / 'test_metrics.json').read_text())['metrics']
        with open(out / 'predictions.pkl', 'rb') as f:
            results[name] = (metrics, pickle.load(f))
    (one, one_predictions), (two, two_predictions) = results['one'], results['two']
    assert TWO_ON_CPU in proc.stdout + proc.stderr
    assert one['coco/bbox_mAP'] > 0
    assert two == one  # bbox and segm AP, exactly
    # three images, each once, in order, with the same predictions
    assert [p['img_id'] for p in two_predictions] == [p['img_id'] for p in one_predictions] \
        == [1, 2, 3]
    for a, b in zip(one_predictions, two_predictions):
        a, b = a['pred_instances'], b['pred_instances']
        assert len(a['scores']) == 100
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(a[key], b[key]), key
        assert a['masks'] == b['masks']  # run-length encoded


@pytest.mark.slow
def test_upernet_killed_on_two_processes_resumes_on_two(dist_cwd):
    work = dist_cwd / 'work_resume'
    total = 6
    # 2 images a process: BatchNorm (the CPU's stand-in for SyncBN) needs more than one
    opts = resume_options(work, total, val_batch=1)
    first = subprocess.Popen(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), SEG_TOY, '2',
                              *opts], cwd=dist_cwd, env=dist_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_first_checkpoint(first, work)
    finally:
        workers = crash(first)
    assert first.returncode == -signal.SIGKILL and len(workers) == 2
    _, done = last_checkpoint_iter(work)
    assert 2 <= done < total
    first_log = the_log(work)
    assert TWO_ON_CPU in first_log and 'Iter(train) [2/6]' in first_log
    assert not (work / f'iter_{total}.pth').exists()

    proc = run_dist('dist_train.sh', [SEG_TOY, '2', *opts, '--resume'], cwd=dist_cwd)
    assert_ok(proc)
    output = proc.stdout + proc.stderr
    assert TWO_ON_CPU in output
    assert output.count(SYNC_BN_WARNING) == 1  # one warning, from rank 0
    assert f'resumed epoch: 0, iter: {done}' in output
    assert f'Iter(train) [{done + 1}/{total}]' in output  # goes on with the next iteration
    assert f'Iter(train) [{done}/{total}]' not in output  # and repeats none
    assert output.count(f'Iter(train) [{total}/{total}]') == 1
    assert 'mIoU' in output
    first_run_dir = sorted(p for p in work.iterdir() if p.is_dir())[0]
    assert next(first_run_dir.glob('*.log')).read_text() == first_log  # nothing ran on

    final = _checkpoint_is_weights_only_loadable(str(work / f'iter_{total}.pth'))
    assert final['meta']['iter'] == total
    steps = {float(s['step']) for s in final['optimizer']['state'].values()}
    assert steps == {float(total)}  # AdamW's state came back with the checkpoint


# ------------------------------------------------------------------------------ bad launches
@pytest.fixture
def busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('', 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_busy_port_stops_the_launch_with_one_line(busy_port, tmp_path):
    proc = run_dist('dist_train.sh', [DET_TOY, '2'], cwd=tmp_path, timeout=120,
                    PORT=str(busy_port))
    assert proc.returncode == 2
    assert proc.stdout == ''
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: PORT={busy_port} is already in use')
    assert 'leave PORT unset' in lines[0]


def test_without_port_one_machine_gets_a_free_port_and_several_get_the_default(busy_port):
    port = launch.rendezvous_port({}, nnodes=1, node_rank=0)
    assert port != busy_port and launch.port_is_free(port)
    assert launch.rendezvous_port({}, nnodes=2, node_rank=1) == launch.DEFAULT_PORT
    with pytest.raises(ToolError, match=f'PORT={busy_port} is already in use'):
        launch.rendezvous_port({'PORT': str(busy_port)}, nnodes=2, node_rank=0)
    # only node 0 serves the rendezvous; the others do not look at their own port
    assert launch.rendezvous_port({'PORT': str(busy_port)}, 2, 1) == busy_port


def test_more_processes_than_gpus_is_refused_before_and_after_the_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1')
    assert launch.check_process_count('2') == 2
    with pytest.raises(ToolError) as e:
        launch.check_process_count('3')
    assert '3 processes asked for' in str(e.value) and '2 GPU(s)' in str(e.value)
    assert 'CUDA_VISIBLE_DEVICES=0,1' in str(e.value) and 'at most 2' in str(e.value)
    # torchrun started by hand with too many processes: each one says so
    for name, value in dict(RANK='2', LOCAL_RANK='2', WORLD_SIZE='3', LOCAL_WORLD_SIZE='3',
                            MASTER_ADDR='127.0.0.1', MASTER_PORT='29500').items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ToolError, match='3 processes were started .* 2 GPU'):
        dist_utils.setup_distributed(Config(dict(launcher='pytorch')))


@pytest.mark.parametrize('value', ['0', 'two', '-1'])
def test_process_count_must_be_a_positive_integer(value):
    with pytest.raises(ToolError, match=f'GPUS={value!r}'):
        launch.check_process_count(value)


def test_on_gpus_the_launch_is_left_to_mmengine(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='8', LOCAL_WORLD_SIZE='8',
                            MASTER_ADDR='127.0.0.1', MASTER_PORT='29500').items():
        monkeypatch.setenv(name, value)
    cfg = Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    dist_utils.setup_distributed(cfg)
    assert 'model_wrapper_cfg' not in cfg  # mmengine's MMDistributedDataParallel on GPUs
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    assert not torch.distributed.is_initialized()  # mmengine's init_dist does it


def test_launcher_without_torchrun_or_gpus_says_how_to_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for name in dist_utils.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ToolError, match='RANK, LOCAL_RANK, WORLD_SIZE.*tools/dist_train.sh'):
        dist_utils.setup_distributed(Config(dict(launcher='pytorch')))
    with pytest.raises(ToolError, match='--launcher slurm runs one process per GPU'):
        dist_utils.setup_distributed(Config(dict(launcher='slurm')))
    dist_utils.setup_distributed(Config(dict(launcher='none')))  # one process: nothing to do


def test_cpu_wrapper_keeps_the_configs_ddp_options():
    cfg = Config(dict(find_unused_parameters=True))
    assert dist_utils._cpu_wrapper_cfg(cfg) == dict(
        type='CPUDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=True)
    cfg = Config(dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                             detect_anomalous_params=True)))
    assert dist_utils._cpu_wrapper_cfg(cfg) == dict(type='CPUDistributedDataParallel',
                                                    detect_anomalous_params=True)
    cfg = Config(dict(model_wrapper_cfg=dict(type='MMFullyShardedDataParallel')))
    with pytest.raises(ToolError, match="'MMFullyShardedDataParallel' cannot run on the CPU"):
        dist_utils._cpu_wrapper_cfg(cfg)


def test_a_failing_process_ends_the_launch_with_its_message_and_one_line(tmp_path):
    proc = run_dist('dist_train.sh', ['configs/none.py', '2'], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stdout + proc.stderr
    assert "error: Config file 'configs/none.py' not found" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        'error: train.py exited with status 2 on rank ')

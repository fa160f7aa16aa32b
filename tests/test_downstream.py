"""The toy dataset, and training / testing / resuming through tools/train.py and tools/test.py.

The end-to-end tests run the real toolboxes on a few synthetic images of 64 px, each tool
in its own process and working directory (which holds the toy data under data/toy).
"""
import hashlib
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mmengine.runner import CheckpointLoader

import restv2_mm  # noqa: F401  (registers ResTv2 and the checkpoint loaders)
from restv2_mm.toy_data import TOY_CLASSES, make_toy_data

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_TOY = osp.join(ROOT, 'configs', 'toy', 'maskrcnn_restv2_t_toy.py')
SEG_TOY = osp.join(ROOT, 'configs', 'toy', 'upernet_restv2_t_toy.py')
TIMEOUT = 300

# A few iterations on a few images: enough to go through every stage of the toolboxes.
DET_QUICK = ['train_cfg.max_epochs=1', 'train_dataloader.batch_size=2',
             'val_dataloader.batch_size=2', 'default_hooks.logger.interval=1']
SEG_QUICK = ['train_cfg.max_iters=2', 'train_cfg.val_interval=2',
             'default_hooks.checkpoint.interval=2', 'train_dataloader.batch_size=2',
             'val_dataloader.batch_size=2', 'default_hooks.logger.interval=1']


def run_tool(tool, args, cwd, timeout=TIMEOUT):
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, osp.join(ROOT, 'tools', tool), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def digest(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


def toy_workdir(tmp_path_factory, name: str, num_val: int):
    """A working directory with a tiny toy dataset at data/toy, as the toy configs expect."""
    cwd = tmp_path_factory.mktemp(name)
    make_toy_data(str(cwd / 'data' / 'toy'), kind='both', num_train=4, num_val=num_val,
                  size=64, seed=1)
    return cwd


@pytest.fixture(scope='module')
def toy_cwd(tmp_path_factory):
    return toy_workdir(tmp_path_factory, 'toy_run', num_val=2)


# ------------------------------------------------------------------------------ toy data
def test_toy_data_is_deterministic_in_the_seed(tmp_path):
    make_toy_data(str(tmp_path / 'a'), num_train=3, num_val=2, size=64, seed=3)
    make_toy_data(str(tmp_path / 'b'), num_train=3, num_val=2, size=64, seed=3)
    make_toy_data(str(tmp_path / 'c'), num_train=3, num_val=2, size=64, seed=4)
    a, b, c = (digest(str(tmp_path / k)) for k in 'abc')
    assert len(a) == 2 + 5 + 5 + 5  # 2 json, 5 COCO images, 5 ADE images and 5 label maps
    assert a == b
    assert a != c
    # image i does not depend on how many images come after it
    make_toy_data(str(tmp_path / 'd'), num_train=5, num_val=2, size=64, seed=3)
    d = digest(str(tmp_path / 'd'))
    assert d['coco/train2017/000000000003.jpg'] == a['coco/train2017/000000000003.jpg']


def test_toy_coco_is_valid_coco_with_consistent_annotations(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    make_toy_data(str(tmp_path), kind='coco', num_train=24, num_val=2, size=96, seed=0)
    coco = COCO(str(tmp_path / 'coco' / 'annotations' / 'instances_train2017.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(TOY_CLASSES)
    assert len(coco.getImgIds()) == 24
    per_image, overlapping, sizes = [], 0, []
    for img_id in coco.getImgIds():
        info = coco.imgs[img_id]
        assert osp.isfile(tmp_path / 'coco' / 'train2017' / info['file_name'])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        per_image.append(len(anns))
        for ann in anns:
            mask = coco.annToMask(ann)
            assert mask.shape == (info['height'], info['width'])
            assert ann['iscrowd'] == 0
            assert ann['area'] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            x0, y0 = xs.min(), ys.min()
            assert ann['bbox'] == pytest.approx(
                [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1], abs=1e-6)
            sizes.append(np.sqrt(ann['area']))
        boxes = np.array([a['bbox'] for a in anns], dtype=np.float64)
        if len(anns) > 1:
            ious = mask_utils.iou(boxes, boxes, [0] * len(anns))
            overlapping += int((ious[np.triu_indices(len(anns), 1)] > 0).any())
    assert max(per_image) >= 3  # several instances per image
    assert overlapping >= 2  # and some of them overlap
    assert min(sizes) < 12 and max(sizes) > 30  # small to large (96 px images)


def test_toy_ade_layout_matches_the_coco_scenes(tmp_path):
    import cv2
    from pycocotools.coco import COCO
    make_toy_data(str(tmp_path), kind='both', num_train=6, num_val=3, size=64, seed=0)
    ade = tmp_path / 'ade' / 'ADEChallengeData2016'
    for split, prefix, num in (('training', 'ADE_train', 6), ('validation', 'ADE_val', 3)):
        images = sorted(os.listdir(ade / 'images' / split))
        labels = sorted(os.listdir(ade / 'annotations' / split))
        assert images == [f'{prefix}_{i:08d}.jpg' for i in range(1, num + 1)]
        assert labels == [f'{prefix}_{i:08d}.png' for i in range(1, num + 1)]
    coco = COCO(str(tmp_path / 'coco' / 'annotations' / 'instances_train2017.json'))
    agree = total = 0
    for img_id in coco.getImgIds():
        seg = cv2.imread(str(ade / 'annotations' / 'training' / f'ADE_train_{img_id:08d}.png'),
                         cv2.IMREAD_UNCHANGED)
        assert seg.dtype == np.uint8 and seg.shape == (64, 64)
        assert seg.max() <= len(TOY_CLASSES) + 1
        # ADE's convention: 0 is 'other' (ignored), 1 the background, 2.. the shapes; the
        # label map and the COCO polygons describe the same instances
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            inside = seg[coco.annToMask(ann).astype(bool)]
            assert np.bincount(inside).argmax() == ann['category_id'] + 1
            agree += int((inside == ann['category_id'] + 1).sum())
            total += inside.size
    assert agree / total > 0.97


def test_make_toy_data_cli(tmp_path):
    proc = run_tool('make_toy_data.py', [str(tmp_path), '--kind', 'ade', '--num-train', '2',
                                         '--num-val', '1', '--size', '48', '--seed', '5'],
                    cwd=ROOT, timeout=60)
    assert_ok(proc)
    assert not (tmp_path / 'coco').exists()
    assert len(os.listdir(tmp_path / 'ade' / 'ADEChallengeData2016' / 'images' /
                          'training')) == 2


# ------------------------------------------------------------------------------ end to end
def _checkpoint_is_weights_only_loadable(path):
    from mmengine.logging import HistoryBuffer
    from restv2_mm import checkpoint_globals
    with checkpoint_globals():
        # every type mmengine pickles into its checkpoints is allowed while reading one ...
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        ckpt = torch.load(path, map_location='cpu', weights_only=True)  # ... by the safe loader
    # ... and only then: HistoryBuffer's getattr stays refused elsewhere, as in stock torch
    assert 'builtins.getattr' in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert {'state_dict', 'optimizer', 'meta', 'message_hub', 'param_schedulers'} <= set(ckpt)
    logs = ckpt['message_hub']['log_scalars']
    assert any(isinstance(v, HistoryBuffer) for v in logs.values())
    return ckpt


@pytest.mark.slow
def test_maskrcnn_train_val_test_from_checkpoint(toy_cwd):
    work = toy_cwd / 'work_det'
    proc = run_tool('train.py', [DET_TOY, '--work-dir', str(work), '--cfg-options',
                                 *DET_QUICK], cwd=toy_cwd)
    assert_ok(proc)
    log = (proc.stdout + proc.stderr)
    assert 'Epoch(train) [1][2/2]' in log and 'coco/bbox_mAP' in log  # trained, validated
    ckpt = work / 'epoch_1.pth'
    assert (work / 'last_checkpoint').read_text().strip().endswith('epoch_1.pth')
    _checkpoint_is_weights_only_loadable(str(ckpt))

    pictures = toy_cwd / 'det_pictures'
    proc = run_tool('test.py', [DET_TOY, str(ckpt), '--work-dir', str(work), '--show-dir',
                                str(pictures), '--cfg-options', 'test_dataloader.batch_size=2'],
                    cwd=toy_cwd)
    assert_ok(proc)
    record = json.loads((work / 'test_metrics.json').read_text())
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert isinstance(record['metrics'][key], float)
    assert record['checkpoint'] == str(ckpt)
    assert 'coco/bbox_mAP' in proc.stdout and str(pictures) in proc.stdout
    assert sorted(os.listdir(pictures)) == ['000000000001.jpg', '000000000002.jpg']


@pytest.mark.slow
def test_upernet_train_val_test_from_checkpoint(toy_cwd):
    work = toy_cwd / 'work_seg'
    proc = run_tool('train.py', [SEG_TOY, '--work-dir', str(work), '--cfg-options',
                                 *SEG_QUICK], cwd=toy_cwd)
    assert_ok(proc)
    log = proc.stdout + proc.stderr
    assert 'Iter(train) [2/2]' in log and 'mIoU' in log
    ckpt = work / 'iter_2.pth'
    _checkpoint_is_weights_only_loadable(str(ckpt))

    pictures = toy_cwd / 'seg_pictures'
    proc = run_tool('test.py', [SEG_TOY, str(ckpt), '--work-dir', str(work), '--show-dir',
                                str(pictures)], cwd=toy_cwd)
    assert_ok(proc)
    metrics = json.loads((work / 'test_metrics.json').read_text())['metrics']
    assert set(metrics) >= {'aAcc', 'mIoU', 'mAcc'}
    assert 0 <= metrics['mIoU'] <= 100
    drawn = sorted(os.listdir(pictures / 'vis_data' / 'vis_image'))
    assert drawn == ['test_ADE_val_00000001.jpg_0.png', 'test_ADE_val_00000002.jpg_0.png']
    assert str(pictures / 'vis_data' / 'vis_image') in proc.stdout


def resume_options(work, total: int, val_batch: int):
    """Tool options for a run of ``total`` iterations with a checkpoint every 2."""
    return ['--work-dir', str(work), '--cfg-options', f'train_cfg.max_iters={total}',
            f'train_cfg.val_interval={total}', 'default_hooks.checkpoint.interval=2',
            'default_hooks.checkpoint.max_keep_ckpts=10', 'train_dataloader.batch_size=2',
            f'val_dataloader.batch_size={val_batch}', 'default_hooks.logger.interval=1']


def wait_for_first_checkpoint(proc, work):
    """Poll until ``proc`` has written its first checkpoint (iter_2) and named it last."""
    deadline = time.time() + TIMEOUT
    while not (work / 'iter_2.pth').exists() or not (work / 'last_checkpoint').exists():
        assert proc.poll() is None, 'the first run ended before its first checkpoint'
        assert time.time() < deadline
        time.sleep(0.05)


def last_checkpoint_iter(work):
    """The path of the checkpoint a resume starts from, and its iteration."""
    last = (work / 'last_checkpoint').read_text().strip()
    return last, int(osp.basename(last)[len('iter_'):-len('.pth')])


@pytest.mark.slow
def test_resume_after_sigkill_continues_where_the_checkpoint_left_off(toy_cwd):
    work = toy_cwd / 'work_resume'
    total = 10
    opts = resume_options(work, total, val_batch=2)
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    first = subprocess.Popen([sys.executable, osp.join(ROOT, 'tools', 'train.py'), SEG_TOY,
                              *opts], cwd=toy_cwd, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_first_checkpoint(first, work)
        first.send_signal(signal.SIGKILL)  # between checkpoints, no chance to clean up
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    last, done = last_checkpoint_iter(work)
    assert 2 <= done < total
    first_logs = sorted(p for p in work.iterdir() if p.is_dir())
    first_log = next(first_logs[0].glob('*.log'))
    first_text = first_log.read_text()
    assert 'Iter(train) [ 2/10]' in first_text

    proc = run_tool('train.py', [SEG_TOY, *opts, '--resume'], cwd=toy_cwd)
    assert_ok(proc)
    log = proc.stdout + proc.stderr
    assert f'resumed epoch: 0, iter: {done}' in log
    assert f'Iter(train) [{done + 1:>2}/{total}]' in log  # goes on with the next iteration
    assert f'Iter(train) [{done:>2}/{total}]' not in log  # and repeats none
    assert first_log.read_text() == first_text  # the first run's log stays as it was

    final = _checkpoint_is_weights_only_loadable(str(work / f'iter_{total}.pth'))
    assert final['meta']['iter'] == total
    # AdamW counted every step of both runs: its state came back with the checkpoint
    steps = {float(s['step']) for s in final['optimizer']['state'].values()}
    assert steps == {float(total)}
    # and so did the lr schedule (warm-up, then poly decay)
    assert [s['_global_step'] for s in final['param_schedulers']] == [total, total]
    resumed = CheckpointLoader.load_checkpoint(last, map_location='cpu')
    assert resumed['meta']['iter'] == done


# ------------------------------------------------------------------------------ early errors
def _call(tool_main, argv, capsys):
    code = tool_main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _load_tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'restv2_tools_{name}',
                                                  osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tools():
    return _load_tool('train'), _load_tool('test')


def test_missing_coco_fails_at_once_with_the_layout(tmp_path, monkeypatch, capsys):
    train_tool, test_tool = _tools()
    monkeypatch.chdir(tmp_path)
    config = osp.join(ROOT, 'configs', 'maskrcnn_restv2_t_coco.py')
    code, out = _call(train_tool.main, [config], capsys)
    assert code != 0
    for text in ('data/coco/annotations/instances_train2017.json', 'data/coco/train2017/',
                 'data/coco/val2017/', 'cocodataset.org', 'tools/run_demo.sh',
                 'make_toy_data.py'):
        assert text in out
    ckpt = tmp_path / 'model.pth'
    torch.save({'state_dict': {}}, ckpt)
    code, out = _call(test_tool.main, [config, str(ckpt)], capsys)
    assert code != 0 and 'data/coco/annotations/instances_val2017.json' in out


def test_missing_ade_fails_at_once_with_the_layout(tmp_path, monkeypatch, capsys):
    train_tool, _ = _tools()
    monkeypatch.chdir(tmp_path)
    code, out = _call(train_tool.main, [osp.join(ROOT, 'configs', 'upernet_restv2_t_ade20k.py')],
                      capsys)
    assert code != 0
    for text in ('data/ade/ADEChallengeData2016/images/training/',
                 'data/ade/ADEChallengeData2016/annotations/training/', 'ADEChallengeData2016.zip',
                 'tools/run_demo.sh'):
        assert text in out


def test_missing_pretrained_backbone_says_where_the_weights_come_from(tmp_path, monkeypatch,
                                                                     capsys):
    from restv2_mm.checkpoint import OFFICIAL_CHECKPOINTS_HINT
    train_tool, test_tool = _tools()
    # the real COCO layout, filled with toy data: only the weights are missing
    make_toy_data(str(tmp_path / 'data'), kind='coco', num_train=1, num_val=1, size=64)
    monkeypatch.chdir(tmp_path)
    code, out = _call(train_tool.main, [osp.join(ROOT, 'configs', 'maskrcnn_restv2_s_coco.py')],
                      capsys)
    assert code != 0
    assert 'checkpoints/restv2_small_224.pth' in out
    assert OFFICIAL_CHECKPOINTS_HINT in out
    assert out.count('--cfg-options model.backbone.init_cfg=None') == 1
    code, out = _call(test_tool.main, [osp.join(ROOT, 'configs', 'maskrcnn_restv2_s_coco.py'),
                                       'work_dirs/none/epoch_12.pth'], capsys)
    assert code != 0 and "'work_dirs/none/epoch_12.pth' does not exist" in out


def test_errors_exit_nonzero_without_a_traceback(tmp_path):
    proc = run_tool('train.py', [osp.join(ROOT, 'configs', 'upernet_restv2_b_ade20k.py')],
                    cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr and 'error:' in proc.stderr
    assert 'ADEChallengeData2016' in proc.stderr


@pytest.mark.parametrize('option,text', [
    ('model.backbone.arch=tinyy', "Unknown ResTv2 arch 'tinyy'"),
    ('model.backbone.drop_path=0.1', "unexpected keyword argument 'drop_path'"),
])
def test_a_bad_backbone_argument_fails_before_the_model_is_built(tmp_path, monkeypatch, capsys,
                                                                 option, text):
    train_tool, test_tool = _tools()
    monkeypatch.chdir(tmp_path)  # no data here either: the backbone is checked first
    code, out = _call(train_tool.main, [SEG_TOY, '--cfg-options', option], capsys)
    assert code != 0 and text in out and 'model.backbone' in out and 'MISSING' not in out
    assert '. Fix it in the config' in out and '.. Fix' not in out  # the reason, then the fix
    torch.save({'state_dict': {}}, tmp_path / 'model.pth')
    code, out = _call(test_tool.main, [DET_TOY, 'model.pth', '--cfg-options', option], capsys)
    assert code != 0 and text in out

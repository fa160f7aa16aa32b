"""The speed benchmark and the profiler: quick CPU runs end to end, and the report's logic."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from restv2_mm.benchmark import models, sections, timing
from restv2_mm.benchmark import targets as target_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, 'tools', 'analysis')
SECTIONS = ['backbone224', 'dense', 'styles', 'detector', 'segmentor']
TARGET_IDS = ['1a', '1b', '2a', '2b', '2c', '2d', '2e', '3a', '3b', '3c', '3d', '4a', '4b', '4c',
              '4d', '5a', '5b', '5c']


def load_tool(name):
    path = os.path.join(TOOLS, f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'tools_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def bm():
    return load_tool('benchmark')


def run_tool(name, *args):
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, f'{name}.py'), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def expected_keys():
    styles = ['global', 'win', 'cwin', 'hwin']
    dense = {f'dense/restv2_t_{s}/{m}' for s in styles for m in ('infer', 'train')}
    dense |= {'dense/restv2_t_eager/infer', 'dense/restv2_t_eager/floor',
              'dense/restv2_t_global/new_size/64x64'}
    dense |= {f'dense/{n}/{m}' for n in ('restv2_t_explicit', 'swin_t')
              for m in ('infer', 'train', 'floor')}
    dense |= {f'dense/{n}/{m}' for n in ('pvtv2_b2', 'convnext_t') for m in ('infer', 'floor')}
    return {
        'backbone224': {f'backbone224/{n}' for n in
                        ['restv2_t', 'restv2_s', 'restv2_b', 'restv2_l', 'swin_t', 'pvtv2_b2',
                         'convnext_t']},
        'dense': dense,
        'styles': {f'styles/{s}/{hw}' for s in styles for hw in ('64x96', '96x128', '128x160')},
        'detector': {f'detector/{n}/{m}' for n in ('restv2_t', 'swin_t')
                     for m in ('predict', 'train', 'train_own_optim', 'train_stream')}
        | {'detector/heads_only/predict',  # the ResTv2-T model with fixed features
           'detector/restv2_t_eager/train'},  # the config's fast_training switched
        'segmentor': {f'segmentor/{n}/{m}' for n in ('restv2_t', 'swin_t')
                      for m in ('predict', 'train_own_optim')}
        | {'segmentor/restv2_t_fast_training/train_own_optim'},  # the config's switched
    }


def test_quick_run_measures_every_section_and_writes_json_and_plot(tmp_path):
    out_json, out_plot = tmp_path / 'bench.json', tmp_path / 'styles.png'
    stdout = run_tool('benchmark', '--quick', '--out-json', str(out_json), '--out-plot',
                      str(out_plot))
    report = json.loads(out_json.read_text())

    assert list(report['sections']) == SECTIONS
    for section, keys in expected_keys().items():
        assert set(report['sections'][section]) == keys
    for key, entry in (e for s in report['sections'].values() for e in s.items()):
        if 'convnext_t' in key and entry['status'] == 'skipped':
            assert 'timm' in entry['note']
            continue
        if key.endswith('/floor') or '/new_size/' in key:  # CUDA graphs: GPU only
            assert entry['status'] == 'skipped' and 'GPU' in entry['note']
            continue
        assert entry['status'] == 'ok', (key, entry.get('error'))
        assert entry['median_ms'] > 0 and entry['per_s'] > 0
        assert entry['peak_mb'] is None  # memory is a CUDA statistic
    # The whole models ran their mask heads: the box head keeps up to max_per_img (10 here).
    for name in ('restv2_t', 'swin_t'):
        dets = report['sections']['detector'][f'detector/{name}/predict']
        assert 0 < dets['detections_per_image'] <= 10
    # The whole models that are compared ran side by side.
    entry = report['sections']['detector']['detector/restv2_t/train']
    assert entry['timing'] == ('interleaved with detector/restv2_t_eager/train, '
                               'detector/swin_t/train')
    # a step of the stream is one iteration on each of its batches, of two sizes here
    stream = report['sections']['detector']['detector/restv2_t/train_stream']
    assert stream['items'] == 4 and stream['input'] == [[2, 3, 96, 128], [2, 3, 128, 96]]
    assert report['ratios']['detector/train_stream/time']['value'] > 0
    assert entry['cudnn_benchmark'] is False  # the CPU has no cuDNN to tune
    assert report['ratios']['detector/predict/ceiling']['value'] > 0
    # ResTv2's own configs were used, not the stand-in built from Swin's.
    assert report['sections']['detector']['detector/restv2_t/train']['config'] == \
        'configs/maskrcnn_restv2_t_coco.py'
    for section in ('detector', 'segmentor'):
        entry = report['sections'][section][f'{section}/restv2_t/train_own_optim']
        assert entry['optimizer'] == "the optimizer set-up of the model's own config"
    assert report['sections']['segmentor']['segmentor/restv2_t/predict']['config'] == \
        'configs/upernet_restv2_t_ade20k.py'

    # 800x1344 in the full run is 64x96 here: the styles section reuses the dense one.
    assert report['sections']['styles']['styles/win/64x96']['note'] == 'from the dense section'
    ratio = report['ratios']['dense/win_vs_global/infer/time']
    dense = report['sections']['dense']
    assert ratio['value'] == pytest.approx(dense['dense/restv2_t_win/infer']['median_ms'] /
                                           dense['dense/restv2_t_global/infer']['median_ms'])
    assert report['ratios']['dense/default_vs_explicit/infer/memory']['value'] is None

    targets = report['targets']
    assert [t['id'] for t in targets] == TARGET_IDS
    for t in targets:
        assert t['status'] in ('PASS', 'MISS', 'N/A')
        assert f'{t["status"]:<5} {t["id"]:<3} ' in stdout  # one printed line per target
    assert {t['id']: t['status'] for t in targets}['2b'] == 'N/A'  # no memory on the CPU
    assert report['meta']['env']['device'].startswith('CPU')
    assert report['meta']['env']['torch'] == torch.__version__
    assert '--quick' in report['meta']['command'] and report['meta']['command'] in stdout

    assert out_plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert out_plot.stat().st_size > 10_000


def test_a_failing_measurement_is_reported_and_the_next_one_runs():
    bench = timing.Bench(torch.device('cpu'), amp=False)

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 9.00 GiB')

    def bad_config():
        raise KeyError('neck')

    calls = []

    def fails_on_second_call():
        def step():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError('shape mismatch')
        return step

    oom = bench.measure('dense/a/infer', out_of_memory, (0, 1))
    err = bench.measure('dense/b/infer', bad_config, (0, 1))
    mid = bench.measure('dense/c/infer', fails_on_second_call, (1, 3))
    ok = bench.measure('dense/d/infer', lambda: (lambda: torch.ones(8).sum()), (1, 3), items=4)

    assert oom['status'] == 'OOM' and 'out of memory' in oom['error']
    assert err['status'] == 'error' and err['error'].startswith('KeyError')
    assert mid['status'] == 'error' and 'shape mismatch' in mid['error']
    assert ok['status'] == 'ok' and ok['reps'] == 3 and ok['warmup'] == 1
    assert ok['per_s'] == pytest.approx(4e3 / ok['median_ms'])
    assert set(bench.results) == {'dense/a/infer', 'dense/b/infer', 'dense/c/infer',
                                  'dense/d/infer'}


def test_models_compared_side_by_side_take_their_timed_steps_in_turn():
    bench = timing.Bench(torch.device('cpu'), amp=False)
    calls = []

    def model(name, fail_at=None):
        def setup():
            def step():
                calls.append(name)
                if calls.count(name) == fail_at:
                    raise RuntimeError(f'{name} broke')
            return step
        return setup

    def no_config():
        raise KeyError('backbone')

    entries = bench.measure_side_by_side([
        dict(key='detector/a/train', setup=model('a'), items=2, label='A'),
        dict(key='detector/b/train', setup=no_config),
        dict(key='detector/c/train', setup=model('c', fail_at=4)),
        dict(key='detector/d/train', setup=model('d'), unit='FPS'),
    ], (2, 4))

    # warm-ups model by model, then one timed step of each in turn; c drops out when it fails
    assert calls == ['a', 'a', 'c', 'c', 'd', 'd'] + ['a', 'c', 'd'] * 2 + ['a', 'd'] * 2
    a, b, c, d = (entries[f'detector/{k}/train'] for k in 'abcd')
    assert b['status'] == 'error' and b['error'].startswith('KeyError')
    assert c['status'] == 'error' and 'c broke' in c['error']
    assert a['status'] == d['status'] == 'ok' and a['reps'] == d['reps'] == 4
    assert a['timing'] == 'interleaved with detector/d/train' and a['label'] == 'A'
    assert a['per_s'] == pytest.approx(2e3 / a['median_ms']) and d['unit'] == 'FPS'
    assert set(bench.results) == set(entries)


def entry(key, ms, items=1, peak=None, status='ok'):
    e = dict(key=key, section=key.split('/')[0], status=status, items=items)
    if status == 'ok':
        e.update(median_ms=ms, per_s=items * 1e3 / ms, peak_mb=peak)
    return e


def test_targets_pass_miss_or_na_from_ratios_of_the_same_run():
    s = sections.FULL
    results = [
        entry('backbone224/restv2_t', 100, items=200),  # 2000 img/s
        entry('backbone224/swin_t', 100, items=100),  # 1000 img/s: 2.0x, on the line
        entry('backbone224/convnext_t', None, status='skipped'),
        entry('dense/restv2_t_global/infer', 10, 2, peak=500),
        entry('dense/restv2_t_explicit/infer', 25, 2, peak=1000),  # 2.5x, 0.5 memory
        entry('dense/restv2_t_global/train', 9, 2, peak=600),
        entry('dense/restv2_t_explicit/train', 10, 2, peak=1000),  # 0.9 time, 0.6 memory
        entry('dense/restv2_t_win/infer', 10.5, 2),  # 1.05x global
        entry('dense/restv2_t_cwin/infer', 12, 2),  # 1.2x global
        entry('dense/restv2_t_hwin/infer', None, status='OOM'),
        entry('dense/restv2_t_eager/floor', 8, 2),  # fast_inference 1.25x its floor
    ]
    results = {e['key']: e for e in results}
    ratios = target_table.compute_ratios(results, target_table.ratio_definitions(s))
    definitions = target_table.target_definitions(s)
    targets = {t['id']: t for t in target_table.check_targets(ratios, definitions)}

    assert targets['1a']['status'] == 'PASS' and targets['1a']['value'] == pytest.approx(2.0)
    assert targets['1b']['status'] == 'N/A' and 'skipped' in targets['1b']['note']
    assert targets['2a']['status'] == 'PASS' and targets['2a']['value'] == pytest.approx(2.5)
    assert targets['2b']['status'] == 'PASS' and targets['2b']['value'] == pytest.approx(0.5)
    assert targets['2c']['status'] == 'MISS' and targets['2c']['value'] == pytest.approx(0.9)
    assert targets['2d']['status'] == 'MISS' and targets['2d']['value'] == pytest.approx(0.6)
    assert targets['2e']['status'] == 'MISS' and targets['2e']['value'] == pytest.approx(1.25)
    # Without the styles section, 800x1344 style ratios come from the dense section.
    assert targets['3a']['status'] == 'PASS'
    assert targets['3a']['ratio'] == 'dense/win_vs_global/infer/time'
    assert targets['3b']['status'] == 'MISS' and targets['3b']['value'] == pytest.approx(1.2)
    assert targets['3c']['status'] == 'N/A' and 'OOM' in targets['3c']['note']
    for i in ('3d', '4a', '4b', '4c', '4d', '5a', '5b', '5c'):
        assert targets[i]['status'] == 'N/A' and targets[i]['note'] == 'section not run'


def test_gpu_work_ratios_compare_the_kernel_time_of_counted_steps():
    results = [
        entry('dense/restv2_t_global/train', 60, 2, peak=600),
        entry('dense/restv2_t_explicit/train', 66, 2, peak=1000),
        entry('dense/swin_t/train', 70, 2, peak=900),
    ]
    results = {e['key']: e for e in results}
    results['dense/restv2_t_global/train']['kernel_ms'] = 12.
    results['dense/restv2_t_explicit/train']['kernel_ms'] = 20.
    ratios = target_table.compute_ratios(results,
                                         target_table.ratio_definitions(sections.FULL))
    # host-bound steps: 0.91x the time for 0.6x the GPU work
    assert ratios['dense/default_vs_explicit/train/time']['value'] == pytest.approx(60 / 66)
    assert ratios['dense/default_vs_explicit/train/gpu_work']['value'] == pytest.approx(0.6)
    assert 'GPU work' in ratios['dense/default_vs_explicit/train/gpu_work']['label']
    swin = ratios['dense/restv2_t_vs_swin_t/train/gpu_work']  # Swin-T's step was not counted
    assert swin['value'] is None and 'CUDA only' in swin['note']
    assert 'detector/train/gpu_work' not in ratios  # a section that did not run


def test_sections_are_chosen_by_name_and_a_typo_names_the_choices(bm, capsys):
    assert bm.parse_args(['--sections', 'segmentor, dense']).sections == ['dense', 'segmentor']
    assert bm.parse_args([]).sections == SECTIONS
    with pytest.raises(SystemExit):
        bm.parse_args(['--sections', 'backbone224,detectors'])
    err = capsys.readouterr().err
    assert "'detectors'" in err and 'segmentor' in err


def test_toolbox_configs_keep_no_pretrained_checkpoint():
    for path, peer, kind in ((models.RESTV2_DET_CONFIG, models.SWIN_DET_CONFIG, 'det'),
                             (models.RESTV2_SEG_CONFIG, models.SWIN_SEG_CONFIG, 'seg'),
                             ('configs/missing_restv2_config.py', models.SWIN_DET_CONFIG, 'det')):
        model, source, autotune = models.toolbox_model_config(path, peer, kind)
        assert autotune is (kind == 'seg')  # mmdet's env_cfg leaves cudnn autotuning off
        assert 'Pretrained' not in str(model) and model.backbone.type == 'ResTv2'
        assert model.backbone.init_cfg is None
    # A missing ResTv2 config falls back to the peer's with the backbone and neck replaced.
    assert 'not found' in source and model.neck.in_channels == [96, 192, 384, 768]
    swin, _, _ = models.toolbox_model_config(models.SWIN_SEG_CONFIG, models.SWIN_SEG_CONFIG, 'seg')
    assert swin.backbone.type == 'SwinTransformer' and swin.backbone.init_cfg is None


def test_profile_quick_prints_operators_and_time_by_part(tmp_path):
    stdout = run_tool('profile_restv2', '--quick', '--row-limit', '5', '--trace-dir',
                      str(tmp_path))
    for mode in ('infer', 'train'):
        assert f'\n{mode}: ResTv2-tiny attn_style=global attn_impl=sdpa, input 2x3x64x96' in stdout
    assert stdout.count('[top 5 operators by self_cpu_time_total]') == 2
    assert stdout.count('[time by part of the network]') == 2
    for part in ('stem', 'patch_4', 'stage1.attn', 'stage3.mlp'):
        assert f'\n{part} ' in stdout
    traces = sorted(os.listdir(tmp_path))
    assert traces == ['restv2_tiny_global_sdpa_64x96_infer.json',
                      'restv2_tiny_global_sdpa_64x96_train.json']


def test_rounds_keep_each_measurements_lowest_median():
    best = {}
    timing.keep_best_rounds(best, {'a': dict(status='ok', median_ms=9.0, peak_mb=1),
                               'b': dict(status='OOM', median_ms=None)})
    timing.keep_best_rounds(best, {'a': dict(status='ok', median_ms=7.0, peak_mb=2),
                               'b': dict(status='ok', median_ms=5.0)})
    timing.keep_best_rounds(best, {'a': dict(status='ok', median_ms=8.0, peak_mb=3),
                               'b': dict(status='error', median_ms=None)})
    assert best['a']['median_ms'] == 7.0 and best['a']['peak_mb'] == 2
    assert best['a']['round_medians_ms'] == [9.0, 7.0, 8.0]
    assert best['a']['round_peaks_mb'] == [1, 2, 3]  # each round's peak, not only the kept one
    assert best['b']['status'] == 'ok' and best['b']['round_medians_ms'] == [None, 5.0, None]
    assert best['b']['round_peaks_mb'] == [None, None, None]


def test_a_counted_step_reports_its_kernels_and_their_gpu_time():
    from types import SimpleNamespace as Event
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [Event(device_type=cuda, name='gemm', device_time=1500.),
              Event(device_type=cuda, name='elementwise', device_time=250.),
              Event(device_type=cuda, name='Memset (Device)', device_time=40.),
              Event(device_type=cuda, name='Memcpy HtoD', device_time=60.),
              Event(device_type=cpu, name='aten::mm', device_time=0.)]
    assert timing.kernel_summary(events) == (2, 1.75)  # kernels only, in ms
    entry = dict(key='dense/x/train', status='ok', median_ms=7., per_s=2., unit='img/s',
                 kernels=2, kernel_ms=1.75)
    assert timing.progress_line(entry).endswith(', 2 kernels a step (1.8 ms of GPU work)')
    assert timing.kernels_text(dict(kernels=5)) == ', 5 kernels a step'
    assert timing.kernels_text(dict(status='ok')) == ''


def test_rounds_must_be_positive(bm, capsys):
    with pytest.raises(SystemExit):
        bm.parse_args(['--rounds', '0'])
    assert '--rounds 0' in capsys.readouterr().err

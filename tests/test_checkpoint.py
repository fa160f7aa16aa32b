"""Reading checkpoints: what the weights-only loader allows, and only while a checkpoint is read.

mmengine's Runner checkpoints pickle HistoryBuffer statistics as getattr(HistoryBuffer, 'mean');
the authors' files hold an argparse.Namespace. These are allowed inside restv2_mm's and
mmengine's checkpoint loading only, getattr only for those statistics, and torch.load keeps
its stock allowlist everywhere else.
"""
import argparse
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader
from mmengine.runner.checkpoint import _load_checkpoint, save_checkpoint

from restv2_mm import ResTv2, UnsafeCheckpointError, checkpoint_globals, load_backbone
from restv2_mm.checkpoint import read_checkpoint
from restv2_mm.utils.tool import ToolError, read_checkpoint_file

HERE = os.path.dirname(os.path.abspath(__file__))


class GetattrCall:
    """Pickles as ``getattr(owner, name)``, as a crafted checkpoint would."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def runner_checkpoint(path):
    """A checkpoint as mmengine's Runner writes it, message hub logs (HistoryBuffer) included."""
    hub = MessageHub.get_instance(f'test_checkpoint:{path}')
    for loss in (3.0, 1.0, 2.0):
        hub.update_scalar('train/loss', loss)
    save_checkpoint({'meta': {'iter': 3}, 'state_dict': {'w': torch.ones(2)},
                     'message_hub': hub.state_dict()}, str(path))
    return str(path)


def assert_refused_outside_a_read(path):
    """Torch's own allowlist, as without restv2_mm: getattr is not on it."""
    assert 'builtins.getattr' in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location='cpu', weights_only=True)


# Run in a fresh interpreter: the stock refusal before `import restv2_mm`, the same after it
# and after restv2_mm read the file.
STOCK_VS_IMPORTED = r'''
import argparse, json, pickle, sys
import numpy as np, torch
from mmengine.logging import HistoryBuffer

path = sys.argv[1]
buffer = HistoryBuffer()
buffer.update(1.5)
torch.save({'args': argparse.Namespace(lr=1e-3), 'log': buffer, 'array': np.arange(3),
            'stat': HistoryBuffer.mean}, path)

def state():
    try:
        torch.load(path, weights_only=True)
        error = None
    except pickle.UnpicklingError as e:
        error = str(e)
    return dict(error=error, unsafe=torch.serialization.get_unsafe_globals_in_checkpoint(path))

stock = state()
import restv2_mm
imported = state()
from restv2_mm.checkpoint import read_checkpoint
read = read_checkpoint(path)
assert read['log'].mean() == 1.5 and read['args'].lr == 1e-3
print(json.dumps(dict(stock=stock, imported=imported, after_read=state())))
'''


def test_import_leaves_torch_load_refusing_getattr_as_stock_torch_does(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    proc = subprocess.run([sys.executable, '-c', STOCK_VS_IMPORTED, str(tmp_path / 'f.pth')],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    stock = seen['stock']
    assert stock['error'] is not None
    assert {'builtins.getattr', 'argparse.Namespace',
            'mmengine.logging.history_buffer.HistoryBuffer'} <= set(stock['unsafe'])
    assert seen['imported'] == stock
    assert seen['after_read'] == stock


def test_runner_checkpoint_reads_through_mmengine_loading(tmp_path):
    path = runner_checkpoint(tmp_path / 'iter_3.pth')
    ckpt = _load_checkpoint(path, map_location='cpu')  # what Runner.resume and load_from call
    assert ckpt['meta']['iter'] == 3
    log = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(log, HistoryBuffer)
    assert log.mean() == 2.0 and log.statistics('max') == 3.0 and log.current() == 2.0
    assert_refused_outside_a_read(path)  # the allowance ended with the read


def test_checkpoint_behind_a_url_reads_through_mmengine_loading(tmp_path, monkeypatch):
    import mmengine.runner.checkpoint as mm_checkpoint
    path = runner_checkpoint(tmp_path / 'iter_3.pth')
    fetched = []

    def fake_download(url, model_dir=None, map_location=None, progress=False):
        fetched.append(url)
        return torch.load(path, map_location=map_location)  # as mmengine's load_url does

    monkeypatch.setattr(mm_checkpoint, 'load_url', fake_download)
    url = 'https://example.org/iter_3.pth'
    ckpt = CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert fetched == [url]
    assert ckpt['message_hub']['log_scalars']['train/loss'].mean() == 2.0


def test_every_history_buffer_statistic_reads(tmp_path):
    path = str(tmp_path / 'stats.pth')
    torch.save({'stats': [HistoryBuffer.min, HistoryBuffer.max, HistoryBuffer.current,
                          HistoryBuffer.mean]}, path)
    assert read_checkpoint(path)['stats'] == [HistoryBuffer.min, HistoryBuffer.max,
                                              HistoryBuffer.current, HistoryBuffer.mean]


@pytest.mark.parametrize('owner, name, shown', [
    (HistoryBuffer, 'update', "getattr(HistoryBuffer, 'update')"),
    (HistoryBuffer, '__init__', "getattr(HistoryBuffer, '__init__')"),
    (argparse.Namespace, '__setattr__', "getattr(Namespace, '__setattr__')"),
    (np.ndarray, 'tofile', "getattr(ndarray, 'tofile')"),
])
def test_getattr_beyond_history_buffer_statistics_is_refused(tmp_path, owner, name, shown):
    source = ResTv2('tiny').state_dict()
    path = str(tmp_path / 'crafted.pth')
    torch.save({'model': source, 'payload': GetattrCall(owner, name)}, path)
    for read in (read_checkpoint, lambda p: CheckpointLoader.load_checkpoint(p),
                 lambda p: _load_checkpoint(p), lambda p: load_backbone(ResTv2('tiny'), p)):
        with pytest.raises(UnsafeCheckpointError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f'{path} cannot be read with the weights-only loader: '
                                  f'the file calls {shown}')
        assert len(message.splitlines()) == 1
    with pytest.raises(ToolError, match=r'UnsafeCheckpointError: .*calls ' + shown.replace(
            '(', r'\(').replace(')', r'\)')):
        read_checkpoint_file(path)
    assert_refused_outside_a_read(path)  # the allowance ended with the failed read too


def test_unknown_global_is_refused_with_its_name(tmp_path):
    path = str(tmp_path / 'unknown.pth')
    torch.save({'model': {}, 'payload': GetattrCall}, path)  # a class no checkpoint needs
    with pytest.raises(UnsafeCheckpointError,
                       match=r'unknown\.pth cannot be read .*GLOBAL test_checkpoint\.GetattrCall'):
        read_checkpoint(path)


def test_allowances_of_the_program_survive_a_read(tmp_path):
    authors = str(tmp_path / 'authors.pth')
    torch.save({'model': {}, 'args': argparse.Namespace(lr=1e-3)}, authors)
    with torch.serialization.safe_globals([argparse.Namespace]):  # the program's own
        with checkpoint_globals():
            with checkpoint_globals():  # nested
                assert torch.serialization.get_unsafe_globals_in_checkpoint(authors) == []
            assert read_checkpoint(authors)['args'].lr == 1e-3
        assert torch.load(authors, weights_only=True)['args'].lr == 1e-3
    assert torch.serialization.get_unsafe_globals_in_checkpoint(authors) == [
        'argparse.Namespace']

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # the test helpers (reference model, toy data)
REFERENCE = os.path.join(HERE, 'data', 'official_keys')


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA device')
    config.addinivalue_line('markers', 'slow: end-to-end runs of the toolboxes')


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session', autouse=True)
def temporary_files_under_pytest_basetemp(tmp_path_factory):
    """Temporary files of the tests and of the processes they start go under pytest's own
    temporary folder, which pytest keeps for its last few runs only: torchrun's log folders,
    and the socket folders of multiprocessing that the processes killed on purpose (the
    crash tests) cannot remove."""
    import tempfile
    path = str(tmp_path_factory.mktemp('tmp'))
    before = os.environ.get('TMPDIR'), tempfile.tempdir
    os.environ['TMPDIR'] = tempfile.tempdir = path
    yield
    if before[0] is None:
        os.environ.pop('TMPDIR', None)
    else:
        os.environ['TMPDIR'] = before[0]
    tempfile.tempdir = before[1]


@pytest.fixture
def official_keys():
    """Key names of the authors' ImageNet checkpoints (tests/data/official_keys)."""

    def read(arch):
        with open(os.path.join(REFERENCE, f'restv2_{arch}_224.txt')) as f:
            return {line.split('\t')[0] for line in f if line.strip() and line[0] != '#'}

    return read

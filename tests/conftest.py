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


@pytest.fixture
def official_keys():
    """Key names of the authors' ImageNet checkpoints (tests/data/official_keys)."""

    def read(arch):
        with open(os.path.join(REFERENCE, f'restv2_{arch}_224.txt')) as f:
            return {line.split('\t')[0] for line in f if line.strip() and line[0] != '#'}

    return read

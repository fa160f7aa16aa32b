"""The CUDA paths: fp16 autocast with reused half weights, channels-last input, SDPA kernels.

Marked ``gpu``: skipped without a CUDA device (see conftest.py).
"""
import pytest
import torch

from restv2_mm import ResTv2

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matrix products in float32, not TF32, so paths can be compared closely."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cuda_model(**kwargs):
    torch.manual_seed(0)
    model = ResTv2('tiny', **kwargs)
    model.init_weights()
    return model.cuda().eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize('style', ['global', 'win', 'hwin'])
def test_sdpa_equals_explicit_on_cuda_in_float32(style):
    model = cuda_model(attn_style=style, window_size=(16, 8, 4, 2))
    x = torch.rand(2, 3, 225, 301, device='cuda')  # no map is a whole number of windows
    with torch.no_grad():
        fast = model(x)
        model.set_attn_impl('explicit')
        slow = model(x)
    for a, b in zip(fast, slow):
        assert rel_err(a, b) < 1e-4


def test_fp16_inference_follows_float32_and_reuses_half_weights():
    model = cuda_model()
    x = torch.rand(2, 3, 225, 301, device='cuda')
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cuda', dtype=torch.float16):
            first = model(x)
            again = model(x)  # from the kept half copies
    for r, a, b in zip(ref, first, again):
        assert a.dtype == torch.float16
        assert rel_err(b, a) < 1e-4
        assert rel_err(a, r) < 2e-2
    assert model.stage1[0].attn.q.__dict__['_half_copies'][1].dtype == torch.float16


def test_half_copies_follow_new_weights_on_cuda():
    model = cuda_model()
    x = torch.rand(1, 3, 128, 128, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        before = model(x)
    torch.manual_seed(1)
    other = ResTv2('tiny')
    other.init_weights()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cuda', dtype=torch.float16):
            after = model(x)
    assert rel_err(after[-1], ref[-1]) < 2e-2
    assert rel_err(after[-1], before[-1]) > 0.05


@pytest.mark.parametrize('style', ['global', 'win', 'cwin', 'hwin'])
def test_amp_training_step_on_cuda(style):
    model = cuda_model(attn_style=style, window_size=(16, 8, 4, 2), with_cp=True,
                       drop_path_rate=0.1).train()
    x = torch.rand(2, 3, 160, 224, device='cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        outs = model(x)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

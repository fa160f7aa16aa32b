"""Attention styles of paper Table 3: global, win, cwin, hwin."""
import math

import pytest
import torch
import torch.nn.functional as F

from restv2_mm import ResTv2
from restv2_mm.models import EMSAv2

STYLES = ['global', 'win', 'cwin', 'hwin']


def trained_like(model, seed=0):
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def slow_window_reference(attn: EMSAv2, x, H, W):
    """EMSAv2 in windows, one window at a time, attending only to real (unpadded) keys."""
    B, N, C = x.shape
    r, ws = attn.sr_ratio, attn.window_size
    wr, h, d = ws // r, attn.num_heads, C // attn.num_heads
    q = attn.q(x).reshape(B, H, W, h, d)
    m = x.transpose(1, 2).reshape(B, C, H, W)
    if r > 1:
        m = attn.sr(m)
        red = attn.sr_norm(m.flatten(2).transpose(1, 2))
    else:
        red = x
    Hr, Wr = math.ceil(H / r), math.ceil(W / r)
    k, v = attn.kv(red).reshape(B, Hr, Wr, 2, h, d).unbind(3)
    out = torch.zeros(B, H, W, h, d)
    for i in range(math.ceil(H / ws)):
        for j in range(math.ceil(W / ws)):
            qs = q[:, i * ws:(i + 1) * ws, j * ws:(j + 1) * ws]
            ks = k[:, i * wr:(i + 1) * wr, j * wr:(j + 1) * wr].reshape(B, -1, h, d)
            vs = v[:, i * wr:(i + 1) * wr, j * wr:(j + 1) * wr].reshape(B, -1, h, d)
            wh, ww = qs.shape[1:3]
            qf = qs.reshape(B, -1, h, d)
            a = torch.einsum('bqhd,bkhd->bhqk', qf, ks) / math.sqrt(d)
            o = torch.einsum('bhqk,bkhd->bqhd', a.softmax(-1), vs)
            out[:, i * ws:i * ws + wh, j * ws:j * ws + ww] = o.reshape(B, wh, ww, h, d)
    vmap = v.reshape(B, Hr, Wr, C).permute(0, 3, 1, 2)
    up = F.pixel_shuffle(attn.up(vmap), r)[:, :, :H, :W]
    up = attn.up_norm(up.flatten(2).transpose(1, 2))
    return attn.proj(out.reshape(B, N, C) + up)


@pytest.mark.parametrize('style', ['win', 'hwin'])
def test_win_equals_global_when_one_window(style):
    # 256 x 256: stage maps 64, 32, 16, 8 = the windows (64, 32, 16, 8).
    glob = trained_like(ResTv2('tiny'))
    other = ResTv2('tiny', attn_style=style).eval()
    other.load_state_dict(glob.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        for a, b in zip(other(x), glob(x)):
            assert rel_err(a, b) < 1e-6


def test_win_equals_global_in_one_padded_window():
    # 200 x 232 gives stage maps 50 x 58, ...: each inside one (padded) window.
    glob = trained_like(ResTv2('tiny'))
    win = ResTv2('tiny', attn_style='win').eval()
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 3, 200, 232)
    with torch.no_grad():
        for a, b in zip(win(x), glob(x)):
            assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize('style', ['win', 'cwin', 'hwin'])
def test_styles_differ_from_global_over_several_windows(style):
    glob = trained_like(ResTv2('tiny'))
    other = ResTv2('tiny', attn_style=style).eval()
    other.load_state_dict(glob.state_dict(), strict=False)
    if style == 'cwin':  # zero-initialised: make the cross-window convs do something
        for m in other.cross_window_convs:
            torch.nn.init.normal_(m.conv.weight, std=0.05)
    x = torch.randn(1, 3, 512, 384)
    with torch.no_grad():
        assert rel_err(other(x)[2], glob(x)[2]) > 1e-3


@pytest.mark.parametrize('impl', ['sdpa', 'explicit'])
@pytest.mark.parametrize('dim,heads,sr,ws,H,W', [
    (32, 1, 8, 16, 37, 45),  # padded at the bottom and right, partial reduced cells
    (64, 2, 4, 8, 20, 9),
    (48, 2, 2, 4, 11, 13),
    (32, 4, 1, 4, 10, 7),  # no reduction
    (32, 1, 8, 16, 32, 48),  # whole windows, no padding
])
def test_batched_windows_equal_slow_reference(impl, dim, heads, sr, ws, H, W):
    torch.manual_seed(0)
    attn = EMSAv2(dim, heads, sr_ratio=sr, window_size=ws, attn_impl=impl).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, H * W, dim)
    with torch.no_grad():
        fast = attn(x, H, W)
        slow = slow_window_reference(attn, x, H, W)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_windows_do_not_see_each_other():
    # A map that is one window, alone and as the left window of a wider map with other
    # content (and padding) beside it: the attention output of that window is the same.
    torch.manual_seed(0)
    attn = EMSAv2(32, 2, sr_ratio=2, window_size=8).eval()
    # the upsample branch's 3x3 conv sees across the window border: compare attention only
    torch.nn.init.zeros_(attn.up[0].weight)
    torch.nn.init.zeros_(attn.up[0].bias)
    small = torch.randn(1, 8, 8, 32)
    big = torch.randn(1, 8, 13, 32)
    big[:, :, :8] = small
    with torch.no_grad():
        a = attn(small.flatten(1, 2), 8, 8).view(1, 8, 8, 32)
        b = attn(big.flatten(1, 2), 8, 13).view(1, 8, 13, 32)
    torch.testing.assert_close(a, b[:, :, :8], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('style', ['win', 'hwin'])
def test_global_checkpoint_loads_strictly_into_win_and_hwin(style):
    glob = ResTv2('tiny')
    other = ResTv2('tiny', attn_style=style)
    assert set(other.state_dict()) == set(glob.state_dict())
    other.load_state_dict(glob.state_dict(), strict=True)


def test_cwin_adds_only_its_cross_window_convs():
    glob = set(ResTv2('tiny').state_dict())
    cwin = ResTv2('tiny', attn_style='cwin')
    extra = set(cwin.state_dict()) - glob
    assert glob <= set(cwin.state_dict())
    assert extra == {f'cross_window_convs.{i}.conv.{p}' for i in range(4)
                     for p in ('weight', 'bias')}
    assert cwin.cross_window_convs[2].conv.weight.shape == (384, 1, 7, 7)


def test_cwin_starts_as_win_from_a_global_checkpoint():
    glob = trained_like(ResTv2('tiny'))
    win = ResTv2('tiny', attn_style='win').eval()
    cwin = ResTv2('tiny', attn_style='cwin').eval()
    win.load_state_dict(glob.state_dict())
    cwin.load_state_dict(glob.state_dict(), strict=False)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        for a, b in zip(cwin(x), win(x)):
            torch.testing.assert_close(a, b)


def test_hwin_last_block_of_each_stage_is_global():
    model = ResTv2('small', attn_style='hwin')
    for i, depth in enumerate(model.depths):
        windows = [blk.attn.window_size for blk in getattr(model, f'stage{i + 1}')]
        assert windows == [model.window_size[i]] * (depth - 1) + [None]


@pytest.mark.parametrize('style', ['win', 'cwin', 'hwin'])
def test_styles_with_cp_and_both_attention_paths(style):
    torch.manual_seed(0)
    base = ResTv2('tiny', attn_style=style)
    base.init_weights()
    x = torch.randn(1, 3, 160, 200)
    results = []
    for impl, with_cp in [('sdpa', False), ('explicit', False), ('sdpa', True)]:
        model = ResTv2('tiny', attn_style=style, attn_impl=impl, with_cp=with_cp,
                       window_size=(32, 16, 8, 4))
        model.load_state_dict(base.state_dict())
        model.train()
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results.append(([o.detach() for o in outs], model.stage3[0].attn.q.weight.grad))
    for outs, grad in results[1:]:
        for a, b in zip(outs, results[0][0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(attn_style='swin'), "Unknown attn_style 'swin'"),
    (dict(attn_style='win', window_size=(64, 32, 16)), 'has 3 entries'),
    (dict(attn_style='win', window_size=(60, 32, 16, 8)), r'window_size\[0\]=60.*sr ratio 8'),
    (dict(attn_style='hwin', window_size=(64, 30, 16, 8)), r'window_size\[1\]=30.*sr ratio 4'),
    (dict(attn_style='win', window_size=(64, 32, 0, 8)), r'window_size\[2\]=0'),
])
def test_bad_style_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResTv2('tiny', **kwargs)


def test_windows_train_after_a_first_forward_under_inference_mode():
    """The cached window tables must not be inference tensors: a training step uses them."""
    model = ResTv2('tiny', attn_style='win', window_size=(16, 8, 4, 2))
    x = torch.rand(1, 3, 100, 140)  # no stage map is a whole number of windows
    with torch.inference_mode():
        model.eval()(x)
    outs = model.train()(x)
    sum(o.sum() for o in outs).backward()
    assert model.stage1[0].attn.q.weight.grad is not None


def test_window_tables_are_cached_per_size_least_recently_used_first():
    from restv2_mm.models import windows
    cache = windows._Tables(2)
    made = []

    def maker(key):
        return lambda: made.append(key) or (torch.arange(3), )

    a = cache.get(('a', ), maker('a'))
    assert cache.get(('a', ), maker('a')) is a and made == ['a']
    cache.get(('b', ), maker('b'))
    cache.get(('a', ), maker('a'))  # a is now the most recently used
    cache.get(('c', ), maker('c'))  # b goes
    assert list(cache.entries) == [('a', ), ('c', )] and made == ['a', 'b', 'c']


def test_a_recording_reads_cached_tables_and_keeps_them():
    """What a CUDA graph being recorded gets: the cached tables, collected for the graph to
    keep; tables not cached (or no one to keep them) are built as ops of the graph and do
    not enter the cache, since a recording's ops run only at replay."""
    from restv2_mm.models import windows
    cache = windows._Tables(4)
    cached = cache.get(('x', ), lambda: (torch.arange(3), ))
    fresh = []

    def make():
        fresh.append(1)
        return (torch.arange(5), )

    with windows.keep_tables_read() as kept:
        assert windows._while_capturing(cache, ('x', ), make) is cached
        assert windows._while_capturing(cache, ('y', ), make) is not None
        with windows.keep_tables_read() as inner:  # nested: the inner recording's own list
            windows._while_capturing(cache, ('x', ), make)
    assert kept == [cached] and inner == [cached] and fresh == [1]
    assert ('y', ) not in cache.entries
    windows._while_capturing(cache, ('x', ), make)  # no recording keeps it: built afresh
    assert fresh == [1, 1] and windows._kept is None

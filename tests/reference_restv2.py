"""An independent, literal ResTv2 as the authors' checkpoints were trained, for comparisons.

Deliberately naive: token layout throughout, explicit softmax(QK^T)V, and reshapes that only
work when every stage map is divisible by its reduction ratio (inputs that are multiples of
32), as in the authors' code. Parameter names follow their checkpoints, so a state_dict moves
between this model and ``restv2_mm.ResTv2`` unchanged.
"""
import torch
import torch.nn as nn


class RefPA(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.pa_conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x):
        return x * self.pa_conv(x).sigmoid()


class RefStem(nn.Module):

    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(cin, cout // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(cout // 2), nn.ReLU(),
            nn.Conv2d(cout // 2, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 1, 1, 0))
        self.pos = RefPA(cout)
        self.norm = nn.LayerNorm(cout, eps=1e-6)

    def forward(self, x):
        x = self.pos(self.proj(x))
        B, C, H, W = x.shape
        return self.norm(x.reshape(B, C, H * W).transpose(1, 2)), H, W


class RefPatch(nn.Module):

    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 3, 2, 1)
        self.pos = RefPA(cout)
        self.norm = nn.LayerNorm(cout, eps=1e-6)

    def forward(self, x):
        x = self.pos(self.proj(x))
        B, C, H, W = x.shape
        return self.norm(x.reshape(B, C, H * W).transpose(1, 2)), H, W


class RefAttention(nn.Module):

    def __init__(self, dim, heads, r):
        super().__init__()
        self.h, self.r = heads, r
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if r > 1:
            self.sr = nn.Conv2d(dim, dim, r + 1, r, r // 2, groups=dim)
            self.sr_norm = nn.LayerNorm(dim, eps=1e-6)
        self.up = nn.Sequential(nn.Conv2d(dim, r * r * dim, 3, 1, 1, groups=dim),
                                nn.PixelShuffle(r))
        self.up_norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        d = C // self.h
        q = self.q(x).reshape(B, N, self.h, d).permute(0, 2, 1, 3)
        if self.r > 1:
            m = x.transpose(1, 2).reshape(B, C, H, W)
            x = self.sr_norm(self.sr(m).reshape(B, C, -1).transpose(1, 2))
        kv = self.kv(x).reshape(B, -1, 2, self.h, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        ident = v.transpose(-1, -2).reshape(B, C, H // self.r, W // self.r)
        ident = self.up(ident).flatten(2).transpose(1, 2)
        return self.proj(out + self.up_norm(ident))


class RefBlock(nn.Module):

    def __init__(self, dim, heads, r):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads, r)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x))


class RefResTv2(nn.Module):
    """Classification-layout model plus the four output norms of the dense backbone."""

    def __init__(self, dims, depths, heads, ratios, num_classes=1000):
        super().__init__()
        self.stem = RefStem(3, dims[0])
        for i in range(1, 4):
            setattr(self, f'patch_{i + 1}', RefPatch(dims[i - 1], dims[i]))
        for i in range(4):
            setattr(self, f'stage{i + 1}',
                    nn.ModuleList(RefBlock(dims[i], heads[i], ratios[i]) for _ in range(depths[i])))
            setattr(self, f'norm{i}', nn.LayerNorm(dims[i], eps=1e-6))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x):
        B = x.shape[0]
        outs = []
        x, H, W = self.stem(x)
        for i in range(4):
            if i > 0:
                x = x.transpose(1, 2).reshape(B, -1, H, W)
                x, H, W = getattr(self, f'patch_{i + 1}')(x)
            for blk in getattr(self, f'stage{i + 1}'):
                x = blk(x, H, W)
            y = getattr(self, f'norm{i}')(x)
            outs.append(y.transpose(1, 2).reshape(B, -1, H, W))
        return outs

    def classification_state_dict(self):
        """The authors' checkpoint layout: no dense output norms."""
        return {k: v for k, v in self.state_dict().items()
                if not (k.startswith('norm') and k[4].isdigit())}

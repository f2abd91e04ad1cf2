"""The one Vision Transformer every method in this repo pretrains.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020, https://arxiv.org/abs/2010.11929.
Cut an image into P x P patches, embed each linearly, prepend a learnable CLS token, add position
embeddings, run pre-norm Transformer blocks, and read the CLS token after the final LayerNorm.

Two stability choices from MoCo v3 (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057, §4.2, §5):
  - a fixed 2-D sin-cos position embedding (the default; `pos_embed="learned"` gives timm's learned one),
  - an optional frozen random patch projection (`freeze_patch_embed=True`) that removes the loss spikes
    self-supervised ViTs show with large learning rates.

Parameter names and shapes are timm's `VisionTransformer` (patch_embed.proj, cls_token, pos_embed,
blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm; LayerNorm eps 1e-6, exact GELU, qkv bias),
so `state_dict()` loads into `timm...VisionTransformer(num_classes=0, ...)` with strict=True and gives the
same output, and timm/DeiT weights load into this class (tests/test_vit.py checks both directions).

    model = vit_tiny(img_size=32, patch_size=4)     # ViT-Tiny/4: 64 patches of 4x4 on CIFAR
    feats = model(images)                           # (B, 192): CLS token after the final norm
    attn = model.get_last_selfattention(images)     # (B, 3, 64): CLS -> patch attention, last block
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_pos_embed(embed_dim, grid_h, grid_w, temperature=10000.0, device=None, field=None):
    """Fixed 2-D sin-cos position embedding with a zero CLS slot: (1, 1 + grid_h * grid_w, D).

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y) (x: column, y: row), with the
    frequencies of the original Transformer (1 / 10000^(i / (D/4))): MoCo v3's vits.py / MAE's embedding,
    up to which coordinate fills the first half of the channels.
    field: (G_h, G_w), the patch grid whose field of view this grid covers, or None: the grid's own (positions
    0 .. g-1). A grid of g patches over the field of G has its patch centres at (i + 0.5) * G / g - 0.5 in the
    units of G's patches: fractional positions spanning the whole field, where the bicubic resampling of a
    learned embedding reads it (align_corners=False: the same centres). For g = G the positions are exactly
    0 .. G-1, so the native table is the same with or without `field`.
    """
    assert embed_dim % 4 == 0, "the 2-D sin-cos embedding splits the width into 4 equal parts"
    d = embed_dim // 4
    field_h, field_w = field or (grid_h, grid_w)
    rows = (torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5) * (field_h / grid_h) - 0.5  # (grid_h,)
    cols = (torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5) * (field_w / grid_w) - 0.5  # (grid_w,)
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(d, dtype=torch.float32, device=device) / d)  # (D/4,)
    x = x.flatten()[:, None] * omega                                                  # (N, D/4)
    y = y.flatten()[:, None] * omega                                                  # (N, D/4)
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)                       # (N, D)
    return torch.cat([torch.zeros(1, embed_dim, device=device), pe])[None]            # (1, 1+N, D)


class PatchEmbed(nn.Module):
    """A strided convolution = one linear map per non-overlapping P x P patch."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):                                  # (B, C, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)     # (B, N, D), N = (H/P) * (W/P)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # bias on q, k, v as timm (qkv_bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)               # each (B, H, N, hd)
        if return_attention:
            # the explicit math, for attention maps: softmax(q kᵀ / sqrt(hd)), (B, H, N, N)
            return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        # softmax(q kᵀ / sqrt(hd)) v in one fused kernel (flash / memory-efficient attention on GPU)
        x = F.scaled_dot_product_attention(q, k, v)        # (B, H, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as timm and the ViT paper
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """pos_embed: "sincos" (fixed, recomputed exactly for other grids, at fractional positions over the same
    field) or "learned" (trained, resampled bicubically for other grids). Load timm/DeiT weights into
    pos_embed="learned": their position embedding is learned, and a "sincos" model would ignore it for any grid
    other than the native one."""

    def __init__(self, *, img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
                 in_chans=3, pos_embed="sincos", freeze_patch_embed=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', not {pos_embed!r}")
        # everything needed to rebuild this backbone; checkpoints store it as "vit_kwargs"
        self.kwargs = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, in_chans=in_chans, pos_embed=pos_embed,
                           freeze_patch_embed=freeze_patch_embed)
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # a Parameter either way, so the state dict has timm's key; the sin-cos one is never trained
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self):
        # timm / DINO: Linear weights trunc-normal(0.02) with zero bias, LayerNorm ones and zeros,
        # CLS token (and a learned position embedding) trunc-normal(0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # patch projection: Xavier-uniform over the flattened P*P*C -> D map, as MoCo v3 (and MAE) do;
        # with freeze_patch_embed it stays at this random init for the whole training
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.kwargs["pos_embed"] == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed(self.embed_dim, self.grid, self.grid))
            self.pos_embed.requires_grad_(False)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.kwargs["freeze_patch_embed"]:
            self.patch_embed.requires_grad_(False)

    def interpolate_pos_embed(self, grid_h, grid_w):
        """Position embedding for a grid_h x grid_w patch grid (multi-crop, other image sizes): (1, 1+N, D)."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        if self.kwargs["pos_embed"] == "sincos":
            # recompute exactly for the new grid over the same field: a small crop is the whole picture at a
            # lower resolution (as the learned embedding's resampling, DINO's), not the top-left corner of it
            return sincos_pos_embed(self.embed_dim, grid_h, grid_w, device=self.pos_embed.device,
                                    field=(self.grid, self.grid)).to(self.pos_embed.dtype)
        # learned: resample the patch part bicubically (antialiased when shrinking), as timm's
        # resample_abs_pos_embed, so multi-crop outputs match timm's dynamic_img_size
        cls_pe, patch_pe = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pe = patch_pe.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)      # (1, D, g, g)
        patch_pe = F.interpolate(patch_pe.float(), size=(grid_h, grid_w), mode="bicubic", antialias=True)
        patch_pe = patch_pe.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)         # (1, gh*gw, D)
        return torch.cat([cls_pe, patch_pe], dim=1)

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)                                          # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)      # (B, 1+N, D)
        return x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)

    def forward_features(self, x):
        """All tokens after the final norm: (B, 1+N, D), CLS first."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        """The CLS token after the final norm: (B, D). No classification head: methods add their own."""
        return self.forward_features(x)[:, 0]

    @torch.no_grad()
    def get_last_selfattention(self, x):
        """CLS-to-patch attention of the last block, for visualization: (B, H, N)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        attn = self.blocks[-1].attn(self.blocks[-1].norm1(x), return_attention=True)  # (B, H, 1+N, 1+N)
        return attn[:, :, 0, 1:]


# Presets: width / depth / heads from DeiT (Touvron et al. 2020, Table 1); vit_mini is this repo's CPU size
# for tests and demos (ViT-Tiny's width and heads, half its depth).
PRESETS = {
    "vit_mini": dict(embed_dim=192, depth=6, num_heads=3),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def vit_mini(**kwargs):
    return VisionTransformer(**PRESETS["vit_mini"], **kwargs)


def vit_tiny(**kwargs):
    return VisionTransformer(**PRESETS["vit_tiny"], **kwargs)


def vit_small(**kwargs):
    return VisionTransformer(**PRESETS["vit_small"], **kwargs)


def vit_base(**kwargs):
    return VisionTransformer(**PRESETS["vit_base"], **kwargs)


ARCHS = {"vit_mini": vit_mini, "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def describe_presets(patch_size=4, in_chans=3):
    """One line per preset for --help: width, depth, heads and trainable parameters of the backbone (the
    sin-cos position embedding is fixed, so the count does not depend on the image size)."""
    lines = []
    for name, p in PRESETS.items():
        D, L = p["embed_dim"], p["depth"]
        # a block: 2 LayerNorms (4D) + qkv (3D^2 + 3D) + proj (D^2 + D) + fc1 (4D^2 + 4D) + fc2 (4D^2 + D)
        n = L * (12 * D * D + 13 * D) + (in_chans * patch_size ** 2 * D + D) + D + 2 * D  # + patch, CLS, norm
        lines.append(f"{name} (width {D}, {L} blocks, {p['num_heads']} heads, {n / 1e6:.1f}M params at patch "
                     f"{patch_size})")
    return "; ".join(lines)

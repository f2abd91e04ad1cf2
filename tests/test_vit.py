"""vit.py: shapes for 32 px and smaller crops, a gradient for every trainable parameter, the frozen patch
projection really frozen, SDPA equal to the explicit softmax(QKᵀ/√d)V, the position embedding for other
grids, attention maps, and parity with timm's VisionTransformer in both directions (timm is the reference)."""
import pytest
import torch

import vit

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def small(**kw):  # 2 blocks are enough to check everything but the presets' sizes
    return vit.VisionTransformer(**{"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2,
                                    "num_heads": 3, **kw})


@pytest.mark.parametrize("arch,width,depth,heads", [("vit_mini", 192, 6, 3), ("vit_tiny", 192, 12, 3),
                                                    ("vit_small", 384, 12, 6), ("vit_base", 768, 12, 12)])
def test_presets(arch, width, depth, heads):
    m = vit.ARCHS[arch](img_size=32, patch_size=8)
    assert (m.embed_dim, len(m.blocks), m.num_heads) == (width, depth, heads)
    assert m.pos_embed.shape == (1, 1 + 16, width)


@pytest.mark.parametrize("size,patch", [(32, 4), (32, 8), (16, 4), (24, 8), (48, 4)])
def test_shapes_for_other_sizes(size, patch):
    m = small(patch_size=patch)
    x = torch.randn(3, 3, size, size)
    n = (size // patch) ** 2
    assert m.forward_features(x).shape == (3, 1 + n, 48)
    assert m(x).shape == (3, 48)
    assert m.get_last_selfattention(x).shape == (3, 3, n)


def test_non_square_input_and_bad_sizes():
    m = small()
    assert m.forward_features(torch.randn(2, 3, 32, 16)).shape == (2, 1 + 8 * 4, 48)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        small(img_size=30)
    with pytest.raises(ValueError, match="pos_embed"):
        small(pos_embed="rope")


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_gradient_reaches_every_trainable_parameter(pos_embed):
    m = small(pos_embed=pos_embed)
    m(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert ("pos_embed" in trainable) == (pos_embed == "learned")  # the sin-cos table is fixed
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_frozen_patch_projection_stays_frozen():
    m = small(freeze_patch_embed=True)
    w0 = m.patch_embed.proj.weight.clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        m(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    assert torch.equal(m.patch_embed.proj.weight, w0)
    assert not torch.equal(m.blocks[0].attn.qkv.weight, small(freeze_patch_embed=True).blocks[0].attn.qkv.weight)


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(0)
    attn = small().blocks[0].attn
    x = torch.randn(2, 65, 48)
    B, N, D = x.shape
    H, hd = attn.num_heads, D // attn.num_heads
    q, k, v = attn.qkv(x).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / hd ** 0.5, dim=-1)        # (B, H, N, N)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, return_attention=True), weights)


def test_attention_map_is_a_distribution():
    m = small()
    x = torch.randn(2, 3, 32, 32)
    cls_to_patch = m.get_last_selfattention(x)                                  # (B, H, N)
    assert (cls_to_patch >= 0).all()
    assert (cls_to_patch.sum(-1) < 1).all()  # the rest of the mass is on the CLS token itself
    # the same map from the explicit attention of the last block, computed by hand
    tokens = m.prepare_tokens(x)
    for blk in m.blocks[:-1]:
        tokens = blk(tokens)
    full = m.blocks[-1].attn(m.blocks[-1].norm1(tokens), return_attention=True)
    torch.testing.assert_close(cls_to_patch, full[:, :, 0, 1:])
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 3, 65))


def test_sincos_pos_embed_properties():
    pe = vit.sincos_pos_embed(48, 8, 8)
    assert pe.shape == (1, 65, 48)
    assert torch.equal(pe[0, 0], torch.zeros(48))                              # CLS slot is zero
    assert torch.unique(pe[0, 1:], dim=0).shape[0] == 64                       # every patch distinct
    # the embedding of patch (row i, col j) depends only on (i, j): a 4x4 grid on its own is the 8x8 grid's corner
    corner = pe[0, 1:].view(8, 8, 48)[:4, :4].reshape(16, 48)
    torch.testing.assert_close(vit.sincos_pos_embed(48, 4, 4)[0, 1:], corner)
    m = small()
    torch.testing.assert_close(m.interpolate_pos_embed(4, 6), vit.sincos_pos_embed(48, 4, 6, field=(8, 8)))
    assert m.interpolate_pos_embed(8, 8) is m.pos_embed
    # the native table is the same with or without a field, bit for bit (checkpoints store it)
    assert torch.equal(vit.sincos_pos_embed(48, 8, 8, field=(8, 8)), pe)


def sincos_at(positions_y, positions_x, D):
    """The 2-D sin-cos formula written out at given (row, column) positions: (N, D)."""
    d = D // 4
    omega = 1.0 / 10000.0 ** (torch.arange(d, dtype=torch.float64) / d)
    x, y = positions_x[:, None].double() * omega, positions_y[:, None].double() * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


def decoded_positions(pe):
    """(row, column) of each patch read back from the lowest-frequency channels: (N,), (N,)."""
    d = pe.shape[1] // 4
    omega = 1.0 / 10000.0 ** ((d - 1) / d)     # angles up to 8 * 2e-4 here: atan2 inverts them without wrapping
    return torch.atan2(pe[:, 3 * d - 1], pe[:, 4 * d - 1]) / omega, torch.atan2(pe[:, d - 1], pe[:, 2 * d - 1]) / omega


@pytest.mark.parametrize("g", [2, 4])
def test_small_crop_sincos_positions_span_the_whole_field(g):
    """Catches a small crop (multi-crop's 2x2 or 4x4 patch grid) whose sin-cos positions are 0 .. g-1, the top-left
    corner of the global 8x8 grid, instead of the whole field at a lower resolution (a small crop is a whole
    picture, as the learned embedding's resampling and DINO have it): its patch centres sit at
    (i + 0.5) * 8 / g - 0.5 in global-grid units, so its mean position is the global grid's centre and its
    patches tile the same extent; a learned table resampled to g has the same centre."""
    m = small()                                                            # 32 px, patch 4: an 8x8 grid
    pe = m.interpolate_pos_embed(g, g)[0]                                  # (1 + g*g, D)
    assert torch.equal(pe[0], torch.zeros(48))                             # CLS slot still zero
    centres = (torch.arange(g) + 0.5) * 8 / g - 0.5                        # (g,) in global-grid units
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    torch.testing.assert_close(pe[1:], sincos_at(rows.flatten(), cols.flatten(), 48), atol=1e-6, rtol=1e-5)
    y, x = decoded_positions(pe[1:])
    y_full, x_full = decoded_positions(m.pos_embed[0, 1:])
    for small_crop, full in ((y, y_full), (x, x_full)):
        assert small_crop.mean().item() == pytest.approx(full.mean().item(), abs=1e-3)     # 3.5: the centre
        step = 8 / g                                                       # one small patch in global units
        # the outer edges of the first and last patches: -0.5 and 7.5, the global grid's own edges
        assert small_crop.min().item() - step / 2 == pytest.approx(full.min().item() - 0.5, abs=1e-3)
        assert small_crop.max().item() + step / 2 == pytest.approx(full.max().item() + 0.5, abs=1e-3)
    learned = small(pos_embed="learned")
    with torch.no_grad():
        learned.pos_embed.copy_(m.pos_embed)
    y_learned, x_learned = decoded_positions(learned.interpolate_pos_embed(g, g)[0, 1:].detach())
    assert x_learned.mean().item() == pytest.approx(x.mean().item(), abs=1e-3)
    assert y_learned.mean().item() == pytest.approx(y.mean().item(), abs=1e-3)


def make_timm(**kw):
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 0}
    return timm_vit.VisionTransformer(**{**args, **kw}).eval()


def test_our_weights_load_into_timm_with_the_same_output():
    m = small().eval()
    t = make_timm()
    t.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(t(x), m(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.forward_features(x), m.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [32, 16, 48])
def test_timm_weights_load_into_ours_with_the_same_output(size):
    torch.manual_seed(0)
    t = make_timm(dynamic_img_size=True)                  # timm resamples pos_embed for other sizes
    torch.nn.init.normal_(t.pos_embed, std=0.5)           # a learned, non-trivial position embedding
    m = small(pos_embed="learned").eval()
    m.load_state_dict(t.state_dict(), strict=True)
    x = torch.randn(3, 3, size, size)
    torch.testing.assert_close(m(x), t(x), atol=1e-5, rtol=1e-5)


def test_init_statistics():
    m = vit.vit_small(img_size=32, patch_size=4)
    w = m.blocks[0].mlp.fc1.weight
    # trunc_normal_(std=0.02) cuts at ±2 absolute (timm/DINO's quirk), i.e. practically a normal(0, 0.02)
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.equal(m.blocks[0].attn.qkv.bias, torch.zeros_like(m.blocks[0].attn.qkv.bias))
    assert torch.equal(m.norm.weight, torch.ones(384))
    fan = 3 * 4 * 4 + 384                                  # Xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert m.patch_embed.proj.weight.abs().max() <= (6 / fan) ** 0.5

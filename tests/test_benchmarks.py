"""benchmarks/cost_curve.py and the memory measurement it shares with benchmarks/method_speed.py, on CPU; the
figures the README shows: the study's attention figure (benchmarks/plots.py) drawn patch by patch with a colour
bar, and the view grids (data.py --show) with a header naming every column.

(The study has its own tests in test_study.py; the speed benchmarks' figures are measured, not tested.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cost_curve  # noqa: E402
import data  # noqa: E402
import method_speed  # noqa: E402
import plots  # noqa: E402
import vit  # noqa: E402

SAMPLE = ROOT / "tests" / "data_sample"

CPU = torch.device("cpu")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the CPU measurement needs Linux's /proc")
def test_peak_memory_sees_an_allocation_made_and_freed_after_the_reset():
    """Catches reading the current resident set instead of the peak (a freed tensor leaves nothing), and the
    peak not being reset (an earlier, larger allocation would be reported)."""
    mb = 2 ** 20
    big = torch.ones(512 * mb // 4)  # 512 MB touched before the reset: must not count
    del big
    start = method_speed.reset_peak_memory(CPU)
    x = torch.ones(192 * mb // 4)    # 192 MB, touched page by page
    del x
    grown = (method_speed.peak_memory(CPU) - start) / mb
    assert 180 < grown < 260, grown


def test_points_vary_one_axis_at_a_time_from_the_base():
    got = cost_curve.points([32, 4, 64], sizes=[64, 96], patches=[8, 2, 4], batches=[64, 128])
    assert got == [(32, 4, 64), (64, 4, 64), (96, 4, 64), (32, 8, 64), (32, 2, 64), (32, 4, 128)]


@pytest.mark.needs_byol
def test_one_point_runs_the_method_and_measures_it(tmp_path):
    """Catches the child process not running the step (no figures), a memory reading of nothing, and a child
    that does not get the parent's data (another --dataset, or a relative --data-dir read from another folder)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_curve.py"), "--methods", "byol",
                        "--base", "32", "8", "8", "--sizes", "--patches", "--batches", "--arch", "vit_mini",
                        "--steps", "1", "--warmup", "1", "--workers", "0", "--out", "points.jsonl",
                        "--dataset", "folder", "--data-dir", os.path.relpath(SAMPLE, tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (point,) = map(json.loads, (tmp_path / "points.jsonl").read_text().splitlines())
    assert (point["method"], point["size"], point["patch"], point["batch"]) == ("byol", 32, 8, 8)
    assert point["img_s"] > 0 and point["step_mb"] > 1  # BYOL's 4096-wide heads alone hold MBs of AdamW state


# ---- the figures ----

def tiny_vit(patch_size):
    torch.manual_seed(patch_size)
    return vit.VisionTransformer(img_size=32, patch_size=patch_size, embed_dim=32, depth=1, num_heads=2).eval()


@pytest.mark.parametrize("patch", [4, 8])
def test_attention_maps_are_drawn_patch_by_patch_in_units_of_uniform(patch):
    """Catches a smoothed (bilinear) map that blurs the 8x8 or 4x4 patches into blobs, a map not aligned with its
    patches, and values not in units of the uniform share (mean 1: what the colour bar's 1 means)."""
    backbone, x = tiny_vit(patch), torch.randn(3, 3, 32, 32)
    maps = plots.attention_maps(backbone, x)
    g = 32 // patch
    assert maps.shape == (3, 32, 32)
    blocks = maps.reshape(3, g, patch, g, patch)                                       # (B, gy, py, gx, px)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # one value per patch, over its p x p pixels
    attn = backbone.get_last_selfattention(x).mean(1)                                  # (B, N)
    torch.testing.assert_close(blocks[:, :, 0, :, 0].reshape(3, g * g), attn / attn.sum(1, keepdim=True) * g * g)
    torch.testing.assert_close(maps.mean((1, 2)), torch.ones(3))


def test_attention_figure_has_a_colour_bar_and_unsmoothed_maps(tmp_path, monkeypatch):
    """Catches the study's attention figure without its colour bar, drawn with a smoothing interpolation, with
    one colour scale per image (the bar would then mean nothing), or not written. A study folder's minimum: two
    random-init checkpoints (patch 4 and 8) and the test images of the shipped sample."""
    pytest.importorskip("matplotlib")
    models = []
    for name, patch in (("random", 4), ("simclr", 8)):
        m = tiny_vit(patch)
        torch.save({"method": name, "epoch": 0, "args": {"dataset": "folder"}, "vit_kwargs": m.kwargs,
                    "backbone": m.state_dict()}, tmp_path / f"{name}.pt")
        models.append({"model": name, "seed": 0, "part": "main", "ckpt": str(tmp_path / f"{name}.pt")})
    study = {"models": models, "methods": ["simclr"], "trees": {"eval": str(SAMPLE)}, "cfg": {"img_size": 32}}
    figures, save = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, out: (figures.append(fig), save(fig, out)))
    plots.attention(study, tmp_path / "attention.png", n_images=3)
    with open(tmp_path / "attention.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3 + 2 * 3  # row 0: the test images; then a row per network
    maps = images[3:]
    assert all(im.get_interpolation() == "nearest" and im.get_array().shape == (32, 32) for im in maps)
    assert len({im.get_clim() for im in maps}) == 1 and maps[0].get_clim()[0] == 0  # one scale, from 0
    bars = [im.colorbar for im in maps if im.colorbar is not None]
    assert len(bars) == 1 and bars[0].ax in fig.axes and (bars[0].vmin, bars[0].vmax) == maps[0].get_clim()


def test_view_grid_has_a_header_naming_each_column(tmp_path):
    """Catches a view grid (data.py --show, the study's views_<method>.png) without its header, a label over the
    wrong column, the wrong names (view / global / small) or sizes, and small crops no longer drawn at their size."""
    assert data.show_labels(data.method_specs("byol", 32), 32) == ["original\n32 px", "view 1\n32 px",
                                                                    "view 2\n32 px"]
    assert data.show_labels(data.method_specs("swav", 32), 32) == (
        ["original\n32 px", "global 1\n32 px", "global 2\n32 px"] + [f"small {i}\n16 px" for i in range(1, 7)])
    out = tmp_path / "v.png"
    data.show("swav", out, rows=2)
    img = np.asarray(Image.open(out).convert("L"))
    top = data.SHOW_HEADER
    assert img.shape == (top + 4 * (2 * 34 + 2), 4 * (9 * 34 + 2))  # 4x zoom of 32 px cells, 2 px gaps
    assert (img[:top] > 128).mean() > 0.8  # a white band above the grid ...
    for c in range(9):  # ... with a label centred over each column
        left, right = 4 * (c * 34 + 2), 4 * (c * 34 + 2 + 32)
        ink = np.nonzero((img[:top, left:right] < 100).any(0))[0]
        assert len(ink) > 5 and abs((ink.min() + ink.max()) / 2 - 64) < 4, (c, ink)
    small = img[top + 8:top + 8 + 128, 4 * (3 * 34 + 2):4 * (3 * 34 + 2) + 128]  # row 1, "small 1": 16 of 32 px
    grey = np.ones((128, 128), bool)
    grey[32:96, 32:96] = False
    assert (small[grey] == 128).all() and (small[~grey] != 128).any()

"""benchmarks/cost_curve.py and the memory measurement it shares with benchmarks/method_speed.py, on CPU; the
figures docs/study.md shows: the study's attention figures (benchmarks/plots.py; mean over heads and head by head)
drawn patch by patch with a colour bar, the seeds figure's dots and mean ± std bars, the figures a study folder
lacks the input of skipped with a note, the view grids (data.py --show) with a header naming every column, and
the few-label study's learning curve placed at CPU minutes.

(The study has its own tests in test_study.py; the speed benchmarks' figures are measured, not tested.)
"""
import json
import math
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


def tiny_study(tmp_path, nets, methods):
    """A study folder's minimum for the attention figures: a random-init checkpoint per (model, patch) in nets, as
    the seed-0 network on all classes, and the test images of the shipped sample."""
    models = []
    for name, patch in nets:
        m = tiny_vit(patch)
        torch.save({"method": name, "epoch": 0, "args": {"dataset": "folder"}, "vit_kwargs": m.kwargs,
                    "backbone": m.state_dict()}, tmp_path / f"{name}.pt")
        models.append({"model": name, "seed": 0, "part": "main", "ckpt": str(tmp_path / f"{name}.pt")})
    return {"models": models, "methods": methods, "trees": {"eval": str(SAMPLE)}, "cfg": {"img_size": 32}}


def saved_figures(monkeypatch):
    """The matplotlib figures plots.save is given (and still writes), to inspect their artists."""
    figures, save = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, out: (figures.append(fig), save(fig, out)))
    return figures


def test_attention_figure_has_a_colour_bar_and_unsmoothed_maps(tmp_path, monkeypatch):
    """Catches the study's attention figure without its colour bar, drawn with a smoothing interpolation, with
    one colour scale per image (the bar would then mean nothing), or not written. Two networks, patch 4 and 8."""
    pytest.importorskip("matplotlib")
    study = tiny_study(tmp_path, [("random", 4), ("simclr", 8)], ["simclr"])
    figures = saved_figures(monkeypatch)
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


@pytest.mark.parametrize("patch", [4, 8])
def test_attention_maps_per_head_are_each_heads_own_in_units_of_uniform(patch):
    """Catches per-head maps that are the mean over heads (every head the same), heads swapped or renormalized
    together (one sum over all heads: a head would no longer average 1), and a per-head map not drawn patch by
    patch; the averaged maps (per_head=False) stay what they were."""
    backbone, x = tiny_vit(patch), torch.randn(3, 3, 32, 32)
    maps = plots.attention_maps(backbone, x, per_head=True)
    g = 32 // patch
    assert maps.shape == (3, 2, 32, 32)                                                # (B, H, S, S)
    blocks = maps.reshape(3, 2, g, patch, g, patch)                                    # (B, H, gy, py, gx, px)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()  # one value per patch, over its p x p pixels
    attn = backbone.get_last_selfattention(x)                                          # (B, H, N)
    for h in range(2):  # each head from its own weights, renormalized over the patches: mean 1
        want = attn[:, h] / attn[:, h].sum(1, keepdim=True) * g * g                    # (B, N)
        torch.testing.assert_close(blocks[:, h, :, 0, :, 0].reshape(3, g * g), want)
    torch.testing.assert_close(maps.mean((2, 3)), torch.ones(3, 2))
    assert not torch.allclose(maps[:, 0], maps[:, 1])  # the heads differ, even untrained
    mean = attn.mean(1)
    torch.testing.assert_close(plots.attention_maps(backbone, x)[:, ::patch, ::patch].reshape(3, g * g),
                               mean / mean.sum(1, keepdim=True) * g * g)


@pytest.mark.parametrize("nets, methods, shown", [
    ([("random", 4), ("simclr", 8), ("dino", 4)], ["simclr", "dino"], "DINO"),
    ([("random", 4), ("simclr", 8)], ["simclr"], "SimCLR"),  # no DINO network: the first method's
])
def test_attention_heads_figure_has_a_map_per_head_of_the_named_network(tmp_path, monkeypatch, nets, methods, shown):
    """Catches the head-by-head figure of the wrong network (not DINO's when the study has one, a baseline's when
    it has none) or a title that does not name it, a panel missing or too many (rows: images; columns: the image,
    then one per head), maps not of that network's heads (its patch size) or not each head's own, a smoothing
    interpolation, and one colour scale per map."""
    pytest.importorskip("matplotlib")
    study = tiny_study(tmp_path, nets, methods)
    figures = saved_figures(monkeypatch)
    plots.attention_heads(study, tmp_path / "heads.png", n_images=3)
    with open(tmp_path / "heads.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    assert shown in fig._suptitle.get_text()
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3 * (1 + 2)  # 3 images x (the image + 2 heads)
    maps = [ax.images[0] for ax in panels if ax.images[0].get_array().ndim == 2]
    assert len(maps) == 3 * 2 and all(im.get_interpolation() == "nearest" for im in maps)
    assert len({im.get_clim() for im in maps}) == 1 and maps[0].get_clim()[0] == 0  # one scale, from 0
    patch = dict(nets)[shown.lower()]
    for im in maps:  # of the named network: its patches, each head averaging 1 (the two heads of an image differ)
        a = np.asarray(im.get_array())
        assert (a == np.repeat(np.repeat(a[::patch, ::patch], patch, 0), patch, 1)).all()
        assert abs(a.mean() - 1) < 1e-5
    assert not np.array_equal(maps[0].get_array(), maps[1].get_array())
    assert sum(im.colorbar is not None for im in maps) == 1


def write_headline(study_dir):
    """A hand-written headline.json: three seeds, two seeds, one seed, a missing column, a model without values."""
    headline = {"columns": ["CIFAR-10 k-NN", "CIFAR-10 fine-tune", "transfer linear"],
                "models": ["random", "supervised", "simclr", "dino"],
                "values": {"random": {"CIFAR-10 k-NN": {"0": 28.5, "1": 29.5, "2": 27.0},
                                      "CIFAR-10 fine-tune": {"0": 20.0}, "transfer linear": {"0": 10.0, "1": 14.0}},
                           "supervised": {"CIFAR-10 k-NN": {"0": 50.0, "1": 53.0, "2": 52.0},
                                          "transfer linear": {"1": 30.0, "0": 33.0}},
                           "simclr": {"CIFAR-10 k-NN": {"0": 35.1, "1": 34.8, "2": 35.5},
                                      "CIFAR-10 fine-tune": {"0": 60.0, "2": 61.0}, "transfer linear": {"2": 22.0}}}}
    (study_dir / "headline.json").write_text(json.dumps(headline))
    return headline


def test_seeds_figure_draws_each_seed_and_mean_plus_minus_sample_std(tmp_path, monkeypatch):
    """Catches the seeds figure plotting the wrong values (another column's, another model's, or one seed's for
    all), a model on another row than its place in headline.json, the population std (n) instead of the sample
    std (n - 1) of the table's ±, a bar drawn for a single seed, and a model without values breaking the figure."""
    pytest.importorskip("matplotlib")
    headline = write_headline(tmp_path)
    figures = saved_figures(monkeypatch)
    plots.seeds(tmp_path, tmp_path / "seeds.png")
    with open(tmp_path / "seeds.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    assert "each dot a seed; bar: mean ± std" in fig._suptitle.get_text()
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels) == headline["columns"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["random init", "supervised", "SimCLR", "DINO"]
    for column, ax in panels.items():
        lines = ax.get_lines()
        dots = {float(ln.get_ydata()[0]): sorted(ln.get_xdata()) for ln in lines if ln.get_marker() == "o"}
        ticks = {float(ln.get_ydata()[0]): list(ln.get_xdata()) for ln in lines if ln.get_marker() == "|"}
        bars = {float(ln.get_ydata()[0]): list(ln.get_xdata()) for ln in lines if ln.get_marker() == "None"}
        want_dots, want_ticks, want_bars = {}, {}, {}
        for y, model in enumerate(headline["models"]):
            v = list(headline["values"].get(model, {}).get(column, {}).values())
            if not v:
                continue
            mean = sum(v) / len(v)
            want_dots[y], want_ticks[y] = sorted(v), [mean]
            if len(v) > 1:
                std = math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))
                want_bars[y] = [mean - std, mean + std]
        for got, want in ((dots, want_dots), (ticks, want_ticks), (bars, want_bars)):
            assert sorted(got) == sorted(want), column  # pytest.approx does not take nested dicts (pytest >= 9.1)
            assert all(got[y] == pytest.approx(want[y]) for y in want), column
    assert panels["CIFAR-10 k-NN"].get_lines()[0].get_color() == "grey"  # the untrained baseline in grey


def test_figures_without_their_input_are_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    """Catches make_figures failing on a study folder without headline.json (every folder older than the seeds
    figure) or without a pretrained network (the head-by-head figure), instead of drawing the rest and saying
    which it skipped; and the seeds figure not drawn when headline.json is there."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(plots, "views", lambda study, outdir: [])
    gone = {"seed": 0, "part": "main", "ckpt": str(tmp_path / "gone.pt"), "run_dir": str(tmp_path / "gone"),
            "cmd": ["python", "simclr.py"]}
    (tmp_path / "study.json").write_text(json.dumps({"models": [{**gone, "model": "random"},
                                                                {**gone, "model": "simclr"}],
                                                     "methods": ["simclr"], "out": str(tmp_path)}))
    write_headline(tmp_path)
    # checkpoints and logs gone (results.jsonl carried without them): only the seeds figure, and no empty panels
    assert [os.path.basename(p) for p in plots.make_figures(tmp_path)] == ["seeds.png"]
    notes = [s for s in capsys.readouterr().out.splitlines() if "skipped" in s]
    assert [s.split(".png")[0] for s in notes] == [f"[plots] {n}" for n in ("curves", "attention", "attention_heads",
                                                                            "pca")], notes
    os.remove(tmp_path / "headline.json")
    for name in ("curves", "attention", "pca"):  # the other figures need networks: not what is tested here
        monkeypatch.setattr(plots, name, lambda study, out: Path(out).write_bytes(b""))
    monkeypatch.setattr(plots, "views", lambda study, outdir: [])
    (tmp_path / "study.json").write_text(json.dumps({"models": [], "methods": ["simclr"], "out": str(tmp_path)}))
    paths = plots.make_figures(tmp_path)
    assert sorted(os.path.basename(p) for p in paths) == ["attention.png", "curves.png", "pca.png"]
    notes = [s for s in capsys.readouterr().out.splitlines() if "skipped" in s]
    assert len(notes) == 2 and "attention_heads.png" in notes[0] and "seeds.png" in notes[1], notes
    write_headline(tmp_path)
    assert "seeds.png" in map(os.path.basename, plots.make_figures(tmp_path))


@pytest.mark.needs_simclr_aug
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


def test_few_label_curve_puts_each_epoch_at_its_cpu_minutes(tmp_path, monkeypatch):
    """Catches the learning curve of the hour drawn against epochs or wall-clock instead of CPU minutes (a shared
    machine would bend it), a pretraining's CPU time not shared out by its epochs' wall-clock, or supervised points
    from a recipe the search did not choose. Expected points computed by hand from the log and the rows."""
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "runs" / "simclr_hour"
    run_dir.mkdir(parents=True)
    log = [{"epoch": 0, "knn_top1": 30.0}, {"epoch": 1, "seconds": 100.0, "loss": 5.0},
           {"epoch": 2, "seconds": 100.0, "loss": 4.9, "knn_top1": 45.0},
           {"epoch": 3, "seconds": 200.0, "loss": 4.8, "knn_top1": 50.0}]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    rows = [{"key": "pretrain:simclr", "cpu_seconds": 900.0, "wall_seconds": 600.0},  # 1.5 CPU s a second
            {"key": "recipe:supervised:500", "lr": 1e-3, "aug": "strong"}]
    for lr, aug, cpu, knn in ((1e-3, "strong", 60.0, 33.0), (1e-3, "strong", 240.0, 36.0), (2e-3, "default", 120.0, 40.0)):
        rows.append({"key": f"search:{lr}:{aug}:{cpu}", "stage": "search", "trainer": "supervised", "task": "500",
                     "lr": lr, "aug": aug, "cpu_seconds": cpu, "monitor_knn": knn, "top1": 20.0, "num_train": 400})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "study.json").write_text(json.dumps({
        "protocol": "few-label", "cfg": {"labels": [500, 5000], "monitor_val_fraction": 0.1},
        "pretrainings": [{"model": "simclr", "run_dir": str(run_dir)}]}))
    figures = saved_figures(monkeypatch)
    assert plots.main([str(tmp_path)]) == [str(tmp_path / "figures" / "few_label_curve.png")]
    (fig,) = figures
    lines = {line.get_label(): list(zip(*line.get_data())) for line in fig.axes[0].lines}
    # epoch 2 after 200 training seconds: 200 x 1.5 / 60 = 5 CPU minutes; epoch 3 after 400: 10
    assert lines["SimCLR"] == [(0.0, 30.0), (5.0, 45.0), (10.0, 50.0)]
    assert lines["supervised, 400 of the 500 labels (search runs)"] == [(1.0, 33.0), (4.0, 36.0)]  # the chosen
    # lr and augmentation only

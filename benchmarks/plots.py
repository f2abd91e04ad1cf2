"""The study's figures, from a study folder (benchmarks/study.py writes them at its end; this redraws them):

    python benchmarks/plots.py runs/study            # -> runs/study/figures/*.png
    python benchmarks/plots.py runs/study --docs     # and copies them to docs/ for docs/study.md

  curves.png      k-NN top-1 (the runs' own monitor) and loss against epoch, every method, from their log.jsonl
  attention.png   the last block's CLS attention (mean over heads) of every network on the same test images
  attention_heads.png   the same attention head by head (DINO's Fig. 3), of the DINO network (else the first method's)
  pca.png         the first two principal components of every network's test features, coloured by class
  views_<m>.png   what each method trains on (data.show: the original, then its views)
  seeds.png       the headline columns seed by seed, with mean ± std: which differences are larger than the seeds'
                  (from headline.json, which study.py writes; an older study folder has none: skipped)

A few-label study folder (study.py --protocol few-label) has one figure:
  few_label_curve.png   the learning curve of the hour: the k-NN monitor against CPU minutes, each pretraining's
                        epochs beside the supervised-on-the-fewest-labels networks of the recipe search

Needs matplotlib (`pip install matplotlib`, in requirements-dev.txt); training and evaluation never do.
Small PNGs (< 200 KB): low dpi, few images, points rather than markers.
"""
import argparse
import json
import os
import shutil
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval_linear  # noqa: E402

LABELS = {"random": "random init", "supervised": "supervised", "simclr": "SimCLR", "moco": "MoCo v3",
          "byol": "BYOL", "swav": "SwAV", "dino": "DINO"}
COLOURS = {"simclr": "tab:blue", "moco": "tab:orange", "byol": "tab:green", "swav": "tab:red", "dino": "tab:purple"}
DPI = 80


class NoMatplotlib(RuntimeError):
    pass


class NoFigure(Exception):
    """A figure whose input the study folder does not have: make_figures notes it and draws the others."""


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise NoMatplotlib("the figures need matplotlib: pip install matplotlib (or pip install -r "
                           "requirements-dev.txt); the results and the table do not") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def save(fig, out):
    """A small PNG: drawn by matplotlib, then reduced to a 256-colour palette (smooth attention maps and thousands
    of points compress badly in RGB; the palette keeps them under 200 KB at no visible cost)."""
    from PIL import Image
    fig.savefig(out)
    pyplot().close(fig)
    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)


def networks(study):
    """The seed-0 networks trained on all classes, in the table's order: [(model, checkpoint path)]. NoFigure where
    none has its checkpoint (deleted, or a results.jsonl carried without them: study.kept_mtime)."""
    models = {m["model"]: m for m in study["models"] if m["seed"] == 0 and m["part"] == "main"}
    order = ["random", "supervised", *study["methods"]]
    nets = [(k, models[k]["ckpt"]) for k in order if k in models and os.path.exists(models[k]["ckpt"])]
    if not nets:
        raise NoFigure("no seed-0 checkpoint in the study folder")
    return nets


def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def curves(study, out):
    """k-NN top-1 of every method in one panel (with the untrained network's as epoch 0), then one loss panel per
    method: the losses live on different scales (NT-Xent below ln 2B, MoCo's times 2 tau, BYOL's 2 - 2 cos, SwAV's
    below ln K)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator  # whole epochs on the x axes
    runs = {m["model"]: m for m in study["models"] if m["seed"] == 0 and m["part"] == "main" and "cmd" in m}
    methods = [m for m in study["methods"] if m in runs and read_log(runs[m]["run_dir"])]
    if not methods:
        raise NoFigure("no seed-0 training log in the study folder")
    start = None
    for r in read_results(study):
        if r.get("run") == "random_s0" and r.get("eval") == "cifar10":
            start = r.get("knn_top1_pretrain_bank", start)
    cols = max(3, len(methods))
    fig = plt.figure(figsize=(2.4 * cols, 5.2), dpi=DPI)
    grid = fig.add_gridspec(2, cols, height_ratios=[1.3, 1])
    ax = fig.add_subplot(grid[0, :])
    for m in methods:
        log = read_log(runs[m]["run_dir"])
        pts = [(r["epoch"], r["knn_top1"]) for r in log if r.get("knn_top1") is not None]
        if start is not None and not (pts and pts[0][0] == 0):  # a log older than its own epoch-0 line
            pts = [(0, start)] + pts
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=LABELS[m], color=COLOURS.get(m))
    if start is not None:
        ax.axhline(start, color="grey", ls="--", lw=1, label="random init")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title("k-NN monitor of each run (memory bank: its pretraining images)", fontsize=10)
    ax.legend(fontsize=8, ncol=5, loc="best")
    ax.grid(alpha=0.3)
    for i, m in enumerate(methods):
        a = fig.add_subplot(grid[1, i])
        log = read_log(runs[m]["run_dir"])
        log = [r for r in log if "loss" in r]  # the epoch-0 line has the untrained network's k-NN only
        a.plot([r["epoch"] for r in log], [r["loss"] for r in log], marker="o", ms=3, color=COLOURS.get(m))
        a.set_title(f"{LABELS[m]} loss", fontsize=9)
        a.set_xlabel("epoch", fontsize=8)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, out)


def pick_test_images(study, n):
    """n test images spread over the (class-sorted) test split: different classes. PIL images and labels."""
    ds = data.build_dataset("folder", study["trees"]["eval"], "test")
    step = max(1, len(ds) // n)
    return [ds[i] for i in range(0, len(ds), step)[:n]], ds.classes


def load(ckpt):
    backbone, meta = eval_linear.load_backbone(ckpt)
    mean_std = tuple(map(tuple, meta["mean_std"] or data.MEAN_STD["folder"]))
    return backbone, meta["vit_kwargs"]["img_size"], mean_std


def attention_maps(backbone, x, per_head=False):
    """The last block's CLS-to-patch attention of images x (B, 3, S, S), averaged over the heads and renormalized
    over the N patches, in units of the uniform share 1/N (1 everywhere: a network that looks everywhere alike),
    each patch's value repeated over its p x p pixels (nearest neighbour: the patches stay patches): (B, S, S).
    per_head=True: every head's map on its own, each renormalized the same way (mean 1 over its patches): (B, H, S, S).
    (Their mean over heads is not the averaged map: each head keeps a different share on the CLS token itself.)"""
    attn = backbone.get_last_selfattention(x)                                           # (B, H, N)
    if not per_head:
        attn = attn.mean(1, keepdim=True)                                               # (B, 1, N)
    attn = attn / attn.sum(-1, keepdim=True) * attn.shape[-1]                            # (B, H or 1, N), mean 1
    p = backbone.patch_size
    g = x.shape[-1] // p
    maps = attn.reshape(*attn.shape[:2], g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)  # (B, H or 1, S, S)
    return maps if per_head else maps[:, 0]


def colour_scale(maps):
    """One colour scale, 0 to vmax, for a figure of attention maps (units of the uniform share), so that the colours
    compare across maps: vmax is the 99th percentile (at least 2), so that the top 1% of patches (a network staring
    at one patch) saturate rather than darken every other map. Returns vmax and the colour bar's `extend`."""
    vmax = max(2.0, float(maps.quantile(0.99)))
    return vmax, "max" if maps.max() > vmax else "neither"


def colour_bar(fig, shown, cax, extend):
    bar = fig.colorbar(shown, cax=cax, extend=extend)
    bar.set_label("attention / uniform share (1/N)", fontsize=8)
    bar.ax.tick_params(labelsize=7)


@torch.no_grad()
def attention(study, out, n_images=5):
    """Rows: the image, then every network's last-block CLS-to-patch attention (attention_maps: mean over heads,
    in units of the uniform share) drawn patch by patch (nearest neighbour, no smoothing: a 4x4 or 8x8 grid shows
    as such) on one colour scale for the whole figure, with its colour bar. As DINO's Fig. 1, coarse: but where a
    network looks (object, background, everywhere alike: 1) shows, and how strongly."""
    plt = pyplot()
    nets = networks(study)
    images, classes = pick_test_images(study, n_images)
    maps = {}
    for model, ckpt in nets:
        backbone, size, mean_std = load(ckpt)
        x = torch.stack([data.eval_transform(size, *mean_std)(img) for img, _ in images])       # (B, 3, S, S)
        maps[model] = attention_maps(backbone, x)                                              # (B, S, S)
    vmax, extend = colour_scale(torch.cat([m.flatten() for m in maps.values()]) if maps else torch.ones(1))
    rows, cols = 1 + len(nets), len(images)
    fig = plt.figure(figsize=(1.3 * cols + 0.6, 1.3 * rows), dpi=DPI)
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [0.08])
    side = study["cfg"]["img_size"]
    for i, model in enumerate([None, *maps]):
        for j, (img, label) in enumerate(images):
            ax = fig.add_subplot(grid[i, j])
            if model is None:
                ax.imshow(img.resize((side, side)), interpolation="nearest")
                ax.set_title(classes[label], fontsize=8)
            else:
                shown = ax.imshow(maps[model][j].numpy(), cmap="inferno", vmin=0.0, vmax=vmax,
                                  interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel("image" if model is None else LABELS[model], fontsize=8)
    if maps:
        colour_bar(fig, shown, fig.add_subplot(grid[1:, -1]), extend)
    fig.suptitle("last block, CLS attention per patch (mean over heads)", fontsize=9)
    fig.tight_layout()
    save(fig, out)


@torch.no_grad()
def attention_heads(study, out, n_images=3):
    """DINO's Fig. 3: the last block's CLS-to-patch attention of every head on its own (attention_maps with
    per_head=True: each head in units of its uniform share), of the study's seed-0 DINO network trained on all
    classes, else of its first method network in the study's order (the title names the network). Rows: n_images
    test images; columns: the image, then one map per head, drawn patch by patch on one colour scale with its colour
    bar. Where DINO's heads split the object into parts, each head's map shows a different one.
    Raises NoFigure when the study has no method network."""
    plt = pyplot()
    nets = dict(networks(study))
    model = "dino" if "dino" in nets else next((m for m in study["methods"] if m in nets), None)
    if model is None:
        raise NoFigure("the study has no self-supervised network")
    backbone, size, mean_std = load(nets[model])
    images, classes = pick_test_images(study, n_images)
    x = torch.stack([data.eval_transform(size, *mean_std)(img) for img, _ in images])           # (B, 3, S, S)
    maps = attention_maps(backbone, x, per_head=True)                                          # (B, H, S, S)
    vmax, extend = colour_scale(maps)
    rows, heads = len(images), maps.shape[1]
    fig = plt.figure(figsize=(1.3 * (1 + heads) + 0.6, 1.3 * rows + 0.3), dpi=DPI)
    grid = fig.add_gridspec(rows, heads + 2, width_ratios=[1] * (1 + heads) + [0.08])
    side = study["cfg"]["img_size"]
    for i, (img, label) in enumerate(images):
        for j in range(1 + heads):  # column 0: the image; j: head j
            ax = fig.add_subplot(grid[i, j])
            if j == 0:
                ax.imshow(img.resize((side, side)), interpolation="nearest")
                ax.set_ylabel(classes[label], fontsize=8)
            else:
                shown = ax.imshow(maps[i, j - 1].numpy(), cmap="inferno", vmin=0.0, vmax=vmax,
                                  interpolation="nearest")
            if i == 0:
                ax.set_title("image" if j == 0 else f"head {j}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    colour_bar(fig, shown, fig.add_subplot(grid[:, -1]), extend)
    fig.suptitle(f"{LABELS[model]} (seed 0): last block, CLS attention of each head", fontsize=9)
    fig.tight_layout()
    save(fig, out)


@torch.no_grad()
def pca(study, out, n_points=1000):
    """Every network's CLS features of ~n_points test images (every k-th: all classes) projected on their first
    two principal components (centred features, SVD), coloured by class."""
    plt = pyplot()
    nets = networks(study)
    ds = data.build_dataset("folder", study["trees"]["eval"], "test")
    idx = list(range(0, len(ds), max(1, len(ds) // n_points)))
    cols = min(3, len(nets))
    rows = -(-len(nets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows + 0.4), dpi=DPI, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for k, (model, ckpt) in enumerate(nets):
        backbone, size, mean_std = load(ckpt)
        sub = torch.utils.data.Subset(data.build_dataset("folder", study["trees"]["eval"], "test"), idx)
        loader = data.build_eval_loader(sub, size, *mean_std, 256, 0)
        feats, labels = eval_linear.extract_features(backbone, loader, "cpu")           # (n, D), (n,)
        x = feats - feats.mean(0)
        _, s, v = torch.linalg.svd(x, full_matrices=False)
        xy = x @ v[:2].T                                                                  # (n, 2)
        share = (s[:2] ** 2).sum() / (s ** 2).sum()
        ax = axes[k // cols, k % cols]
        ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(int(c) % 10) for c in labels], s=3, linewidths=0)
        ax.set_title(f"{LABELS[model]} (PC 1-2: {100 * share:.0f}% of variance)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for k in range(len(nets), rows * cols):
        axes[k // cols, k % cols].axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(c % 10), ms=4) for c in range(len(ds.classes))]
    fig.legend(handles, ds.classes, loc="lower center", ncol=min(10, len(ds.classes)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save(fig, out)


def seeds(study_dir, out):
    """The headline columns seed by seed, so that a reader sees which differences are larger than the spread of
    seeds: one panel per column, the models on the y axis in the file's order (top to bottom), each seed's top-1 a
    dot, the mean a vertical tick, and with two seeds or more a bar of mean ± sample std (the table's ±).
    Reads <study_dir>/headline.json, which study.py writes:
        {"columns": [column, ...], "models": [model, ...],
         "values": {model: {column: {seed (a string): top-1 in %}}}}
    where a model may lack a column or a seed, or have no values at all (nothing drawn in its row).
    Raises NoFigure without that file (study folders older than it)."""
    path = os.path.join(study_dir, "headline.json")
    if not os.path.exists(path):
        raise NoFigure(f"no {path} (a study folder older than this figure)")
    with open(path) as f:
        headline = json.load(f)
    plt = pyplot()
    columns, models = headline["columns"], headline["models"]
    cols = min(3, len(columns))
    rows = -(-len(columns) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1.0, (0.25 * len(models) + 0.8) * rows + 0.4),
                             dpi=DPI, squeeze=False, sharey=True)
    for k, column in enumerate(columns):
        ax = axes[k // cols, k % cols]
        for y, m in enumerate(models):
            values = list(headline["values"].get(m, {}).get(column, {}).values())
            if not values:
                continue
            colour = COLOURS.get(m, "grey" if m == "random" else "black")  # the baselines in grey and black
            mean = statistics.mean(values)
            ax.plot(values, [y] * len(values), "o", ms=3, color=colour, alpha=0.6)
            ax.plot([mean], [y], marker="|", ms=9, mew=1.5, color=colour)
            if len(values) >= 2:
                std = statistics.stdev(values)  # sample std (n - 1), as the table's
                ax.plot([mean - std, mean + std], [y, y], lw=1.5, color=colour)
        ax.set_title(column, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        if k // cols == rows - 1:
            ax.set_xlabel("top-1 (%)", fontsize=8)
    axes[0, 0].set_yticks(range(len(models)), [LABELS[m] for m in models])
    axes[0, 0].set_ylim(len(models) - 0.5, -0.5)  # the first model at the top
    for k in range(len(columns), rows * cols):
        axes[k // cols, k % cols].axis("off")
    fig.suptitle("headline columns over seeds: each dot a seed; bar: mean ± std", fontsize=9)
    fig.tight_layout()
    save(fig, out)


def views(study, outdir):
    """data.show for every method: 4 training images, each as the eval transform sees it, then the method's views."""
    paths = []
    for m in study["methods"]:
        path = os.path.join(outdir, f"views_{m}.png")
        data.show(m, path, dataset="folder", data_dir=study["trees"]["pretrain"], img_size=study["cfg"]["img_size"],
                  rows=4, seed=0)
        paths.append(path)
    return paths


def read_results(study):
    path = os.path.join(study["out"], "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def pretraining_curve(log, row):
    """[(CPU minutes, k-NN top-1)] of a pretraining: its log's monitor lines (the epoch-0 line: the untrained
    network, at 0), each epoch placed at the CPU time the run had spent on its epochs so far. The log has each
    epoch's wall-clock only: the run's CPU time (its results row: the whole command's) is shared out in
    proportion to wall-clock, cpu_seconds / wall_seconds per training second."""
    per_second = row["cpu_seconds"] / row["wall_seconds"]
    points, spent = [], 0.0
    for r in log:
        spent += r.get("seconds", 0.0) if r["epoch"] > 0 else 0.0
        if r.get("knn_top1") is not None:
            points.append((spent * per_second / 60, r["knn_top1"]))
    return points


def few_label_curve(study_dir, out):
    """The learning curve of the hour: the training scripts' k-NN monitor (memory bank: train less a held-out
    fraction of every class; queries: that fraction) against CPU minutes, for each pretraining of a few-label
    study (pretraining_curve) and for the supervised networks trained from scratch on the fewest labels in its
    recipe search (each a complete run of its epochs at the recipe the search chose; its CPU time the run's own,
    x; its queries less the images it trained on). Where the lines cross, the same CPU buys the pretraining better
    features. NoFigure without them."""
    with open(os.path.join(study_dir, "study.json")) as f:
        plan = json.load(f)
    rows = [json.loads(s) for s in open(os.path.join(study_dir, "results.jsonl")) if s.strip()] if os.path.exists(
        os.path.join(study_dir, "results.jsonl")) else []
    curves = {}
    for p in plan["pretrainings"]:
        row = next((r for r in reversed(rows) if r.get("key") == f"pretrain:{p['model']}"), None)
        log = read_log(p["run_dir"])
        if row and row.get("cpu_seconds") and row.get("wall_seconds") and log:
            curves[LABELS[p["model"]]] = (pretraining_curve(log, row), COLOURS.get(p["model"]))
    n = min(plan["cfg"]["labels"])
    searched = [r for r in rows if r.get("stage") == "search" and r["trainer"] == "supervised" and
                r["task"] == str(n) and r.get("monitor_knn") is not None]
    chosen = next((r for r in reversed(rows) if r.get("key") == f"recipe:supervised:{n}"), None)
    if searched and chosen:  # the recipe the search chose: its lr and augmentation, at every epoch count it tried
        pts = sorted((r["cpu_seconds"] / 60, r["monitor_knn"]) for r in searched
                     if (r["lr"], r["aug"]) == (chosen["lr"], chosen["aug"]))
        curves[f"supervised, {searched[0]['num_train']:,} of the {n:,} labels (search runs)"] = (pts, "black")
    if not curves:
        raise NoFigure("no pretraining log with its CPU time and no supervised search run with the k-NN monitor")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=DPI)
    for label, (pts, colour) in curves.items():
        ax.plot(*zip(*pts), marker="o", ms=3, label=label, color=colour)
    ax.set_xlabel("CPU minutes (user + system, all processes)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title(f"k-NN monitor: {plan['cfg']['monitor_val_fraction']:.0%} of each train class held out as "
                 f"queries, the rest the memory bank", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, out)


def make_few_label_figures(study_dir, docs=False):
    """few_label_curve.png of a few-label study folder into <study_dir>/figures/ (and docs/study_few_label_curve.png
    with docs=True); a note where its input is missing. Returns the paths drawn."""
    pyplot()
    os.makedirs(os.path.join(study_dir, "figures"), exist_ok=True)
    path = os.path.join(study_dir, "figures", "few_label_curve.png")
    try:
        few_label_curve(study_dir, path)
    except NoFigure as e:
        print(f"[plots] few_label_curve.png skipped: {e}")
        return []
    if docs:
        shutil.copy(path, os.path.join(ROOT, "docs", "study_few_label_curve.png"))
    return [path]


def make_figures(study_dir, docs=False):
    """Every figure of a study folder into <study_dir>/figures/ (and docs/ with docs=True), but those whose input the
    folder lacks (NoFigure): a one-line note each instead. Returns the paths of the figures drawn."""
    pyplot()  # fail before any work if matplotlib is missing
    with open(os.path.join(study_dir, "study.json")) as f:
        study = json.load(f)
    outdir = os.path.join(study_dir, "figures")
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for name, draw, source in (("curves", curves, study), ("attention", attention, study),
                               ("attention_heads", attention_heads, study), ("pca", pca, study),
                               ("seeds", seeds, study_dir)):
        path = os.path.join(outdir, f"{name}.png")
        try:
            draw(source, path)
        except NoFigure as e:
            print(f"[plots] {name}.png skipped: {e}")
            continue
        paths.append(path)
    paths += views(study, outdir)
    for p in paths:
        print(f"[plots] {os.path.relpath(p)}: {os.path.getsize(p) / 1024:.0f} KB")
    if docs:
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        for p in paths:  # study_curves.png, ..., views_simclr.png
            name = os.path.basename(p)
            shutil.copy(p, os.path.join(ROOT, "docs", name if name.startswith("views_") else f"study_{name}"))
        print(f"[plots] copied {len(paths)} figures to docs/")
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", default="runs/study", help="a study folder (default: %(default)s)")
    p.add_argument("--docs", action="store_true", help="also copy the figures to docs/")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.study, "study.json")):
        raise SystemExit(f"{args.study}: no study.json; run benchmarks/study.py --out {args.study} first")
    with open(os.path.join(args.study, "study.json")) as f:
        few_label = json.load(f).get("protocol") == "few-label"
    try:
        return (make_few_label_figures if few_label else make_figures)(args.study, docs=args.docs)
    except NoMatplotlib as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()

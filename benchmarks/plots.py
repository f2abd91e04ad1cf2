"""The study's figures, from a study folder (benchmarks/study.py writes them at its end; this redraws them):

    python benchmarks/plots.py runs/study            # -> runs/study/figures/*.png
    python benchmarks/plots.py runs/study --docs     # and copies them to docs/ for the README

  curves.png      k-NN top-1 (the runs' own monitor) and loss against epoch, every method, from their log.jsonl
  attention.png   the last block's CLS attention (mean over heads) of every network on the same test images
  pca.png         the first two principal components of every network's test features, coloured by class
  views_<m>.png   what each method trains on (data.show: the original, then its views)

Needs matplotlib (`pip install matplotlib`, in requirements-dev.txt); training and evaluation never do.
Small PNGs (< 200 KB): low dpi, few images, points rather than markers.
"""
import argparse
import json
import os
import shutil
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
    """The seed-0 networks trained on all classes, in the table's order: [(model, checkpoint path)]."""
    models = {m["model"]: m for m in study["models"] if m["seed"] == 0 and m["part"] == "main"}
    order = ["random", "supervised", *study["methods"]]
    return [(k, models[k]["ckpt"]) for k in order if k in models and os.path.exists(models[k]["ckpt"])]


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
    methods = [m for m in study["methods"] if m in runs]
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


def attention_maps(backbone, x):
    """The last block's CLS-to-patch attention of images x (B, 3, S, S), averaged over the heads and renormalized
    over the N patches, in units of the uniform share 1/N (1 everywhere: a network that looks everywhere alike),
    each patch's value repeated over its p x p pixels (nearest neighbour: the patches stay patches): (B, S, S)."""
    attn = backbone.get_last_selfattention(x).mean(1)                                   # (B, N)
    attn = attn / attn.sum(1, keepdim=True) * attn.shape[1]                              # (B, N), mean 1
    p = backbone.patch_size
    g = x.shape[-1] // p
    return attn.reshape(-1, g, g).repeat_interleave(p, 1).repeat_interleave(p, 2)      # (B, S, S)


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
    # one scale: the colours compare across networks; the top 1% of patches (a network staring at one patch)
    # saturate rather than darken every other map
    values = torch.cat([m.flatten() for m in maps.values()]) if maps else torch.ones(1)
    vmax = max(2.0, float(values.quantile(0.99)))
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
        bar = fig.colorbar(shown, cax=fig.add_subplot(grid[1:, -1]), extend="max" if values.max() > vmax else "neither")
        bar.set_label("attention / uniform share (1/N)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle("last block, CLS attention per patch (mean over heads)", fontsize=9)
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
        sub = torch.utils.data.Subset(data.build_dataset("folder", study["trees"]["eval"], "test",
                                                         data.eval_transform(size, *mean_std)), idx)
        loader = data.build_loader(sub, 256, 0, train=False)
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


def make_figures(study_dir, docs=False):
    """Every figure of a study folder into <study_dir>/figures/ (and docs/ with docs=True). Returns the paths."""
    pyplot()  # fail before any work if matplotlib is missing
    with open(os.path.join(study_dir, "study.json")) as f:
        study = json.load(f)
    outdir = os.path.join(study_dir, "figures")
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for name, draw in (("curves", curves), ("attention", attention), ("pca", pca)):
        paths.append(os.path.join(outdir, f"{name}.png"))
        draw(study, paths[-1])
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
    try:
        return make_figures(args.study, docs=args.docs)
    except NoMatplotlib as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()

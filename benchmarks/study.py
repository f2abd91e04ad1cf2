"""The study: which self-supervised pretraining gives a ViT the best features, how well they generalize and
transfer, against which baselines, at what cost, and which of its differences are larger than the noise of seeds.
One command runs it:

    python benchmarks/study.py --protocol cpu --docs   # vit_mini/8, CIFAR-10, 3 seeds, about 4 hours on 2 CPU
                                                       # cores; --docs: the figures also go to docs/ (docs/study.md)
    python benchmarks/study.py --dataset folder --data-dir ~/my_cifar10_tree   # an ImageFolder copy instead
    python benchmarks/study.py --protocol gpu          # ViT-Tiny/4 and ViT-Small/4, all of CIFAR-10, 100 epochs
    python benchmarks/study.py --protocol gpu --archs vit_tiny/4        # one shape of the two
    python benchmarks/study.py --protocol gpu-quick    # the gpu protocol cut down to minutes (a first look)
    python benchmarks/study.py --protocol cpu --seeds 1      # one seed, about 1.5 hours
    python benchmarks/study.py --protocol cpu --dry-run      # print every command, run nothing
    python benchmarks/study.py --protocol few-label          # the few-label study: 500 / 5,000 labels, supervised
                                                       # from scratch against an hour of SimCLR / SwAV + fine-tune
                                                       # (benchmarks/few_label.py has its protocol), about 6 hours
    python benchmarks/plots.py runs/study --docs       # the figures again, from a finished study folder

SimCLR, MoCo v3, BYOL, SwAV and DINO pretrain the same backbone on the same images for the same epochs and batch,
each through its own command line (`python <method>.py ...`, the paper's defaults for everything the study does
not fix), next to two baselines: the same ViT untrained (random init) and the same ViT trained with the labels
of the same images for the same epochs (eval_linear.finetune from random init: supervised). Every network is
then measured with eval_linear's protocols (weighted k-NN k=20 T=0.07; the linear probe's defaults; fine-tuning):
  - pretraining effect: k-NN and linear probe on CIFAR-10 (all train labels -> top-1 on test), and the network
    fine-tuned end to end with the labels of its pretraining images on the supervised baseline's budget;
  - label efficiency: the same probe trained on fixed stratified 1% and 10% of the train labels;
  - unseen classes: each method pretrained again on five classes, k-NN / linear on the other five;
  - transfer: k-NN / linear / fine-tuning on another dataset (tinyimagenet20 by default: 20 Tiny ImageNet
    classes, built by benchmarks/tinyimagenet20.py from the public archive when missing) at the pretraining
    resolution;
  - cost: pretraining wall-clock and images/s on the hardware used.
Seeds (--seeds N: 0..N-1) change the pretraining, the subset draw and the probe and fine-tuning seeds; the table
gives mean ± sample std, and its reading compares every pair of networks in a headline column by a paired t-test
over the seeds (paired: seed s of every network shares its subset draw), with Holm's correction over the column's
pairs, and claims a difference only where the corrected p is below 5% (a compact letter display and one line per
column; reading()).
The evaluations run in this process with eval_linear's functions, so the features are extracted once per network
and data (the CLI would extract them again for every probe); each results row records the eval_linear command
that reproduces its numbers.

A killed study resumes: a run whose checkpoint.pt is complete (epoch == epochs) is skipped, a partial one is
continued with the method's --resume, and an evaluation already in results.jsonl for the same checkpoint file
(same modification time) is not redone. The supervised baseline has no checkpoint mid-run: it restarts. A network
whose checkpoint is gone but whose rows are all in results.jsonl, with the commands the study would run now, keeps
its cells and is not trained again: the checkpoints may be deleted to free the disk, or results.jsonl carried into
an empty --out on another machine to finish a study there (the figures need seed 0's checkpoints and logs).

Does a fixed subset seen for several epochs teach as much as one pass over all 50,000 images at the same cost
(the cpu protocol's choice)? The same number of steps both ways, SimCLR and the supervised baseline:
    python benchmarks/study.py --protocol cpu --seeds 1 --methods simclr --no-unseen --out runs/study_sub5
    python benchmarks/study.py --protocol cpu --seeds 1 --methods simclr --no-unseen --subset-per-class 0 \\
        --epochs 1 --knn-every 1 --out runs/study_full1

Data: CIFAR-10 from torchvision by default (downloaded into --data-dir, default data/, when missing), written once
as an ImageFolder tree of PNGs (the same pixels) so that the subsets can be symlink trees; any ImageFolder tree with
--dataset folder. Nothing outside the repository and the folders given on the command line is read.

The output folder (--out, default runs/study; with several --archs, each shape's study in <out>/<arch>-<patch>/
with its own runs/, results, table and figures, and <out>/table.md holding every shape's table):
  data/                     <dataset>/ (a torchvision dataset as PNGs) and symlinked ImageFolder trees: the
                            pretraining subset, the five seen / five unseen classes (_s<seed> for seeds > 0)
  runs/<method>_s<seed>/    checkpoint.pt + log.jsonl of each pretraining on all classes (the method's own CLI)
  runs/<method>5_s<seed>/   the same, pretrained on the five seen classes only
  runs/random_s<seed>/, runs/supervised_s<seed>/, runs/supervised5_s<seed>/   the baselines, same file format
  results.jsonl             one line per pretraining (cost, command) and per evaluation (numbers, command)
  table.md                  the markdown table, one line per protocol under it, what the seeds support, the
                            command and the hardware
  headline.json             the headline columns' numbers seed by seed (the seeds figure reads it)
  study.json                the resolved settings (benchmarks/plots.py reads it)
  figures/                  curves.png, attention.png, attention_heads.png, pca.png, seeds.png,
                            views_<method>.png (with matplotlib installed)
"""
import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import time

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval_linear  # noqa: E402
import tinyimagenet20  # noqa: E402  (benchmarks/, beside this file)
import vit  # noqa: E402

METHODS = ["simclr", "moco", "byol", "swav", "dino"]
from plots import LABELS  # noqa: E402  (benchmarks/plots.py: the names in the table and the figures)
LABEL_FRACTIONS = (0.01, 0.1)   # label efficiency: the SimCLR / BYOL semi-supervised tables' 1% and 10%
LABEL_SUBSET_SEED = 0           # the same labelled subsets for every network and every seed

# ---- protocols ----
# Everything the methods share is fixed here; each method's own hyperparameters (lr per 256 images, weight
# decay, temperature, momentum, heads) are its file's defaults, the paper's values. subset_per_class 0 = all
# train images. knn_every: the k-NN monitor in each run's log.jsonl (the curves figure), on the pretraining
# tree (its train subset as the memory bank, the full test split), for the runs on all classes only.
PROTOCOLS = {
    # 2 CPU cores, about 4 hours for 3 seeds. vit_mini/8 (ViT-Tiny's width, half its depth; 16 tokens at 32 px),
    # the size of the README's CPU rows. 1,000 images per class for 5 epochs cost what one pass over all 50,000
    # costs, and give a checkpoint and a curve point every epoch instead of one at the end (a stopped study loses
    # at most an epoch). Whether they also teach as much: for SimCLR yes, 0.1-0.3 points apart (one seed; the
    # README's variants table). Each seed draws its own subset. The unseen-classes pretrainings (a third of the
    # pretraining cost) run for seed 0 only (unseen_seeds). finetune_lr (per 256 images) was chosen on a 10%
    # validation split of the subset's train images, random init and SimCLR alike (docs/study.md); the transfer
    # fine-tuning was sized to see as many images as a pretraining does (25 epochs of tinyimagenet20's 2,000 = 5 of
    # 10,000), but its loader drops each epoch's last partial batch: 25 x 1,792 = 44,800 images against 49,920.
    "cpu": dict(archs=["vit_mini/8"], img_size=32, subset_per_class=1000, epochs=5, batch_size=256,
                warmup_epochs=1, knn_every=2, workers=1, seeds=3, unseen_seeds=1, finetune_lr=1e-3,
                transfer_finetune_epochs=25),
    # One GPU: ViT-Tiny/4 and ViT-Small/4 (64 tokens at 32 px) on all 50,000 images for the method files' default
    # 100 epochs (--epochs 200 for the longer run), batch 512, 10 warmup epochs: the runs a user with one GPU would
    # do. Fine-tuning: MAE's base lr 5e-4 (eval_linear's default; not chosen on a validation split here), 100
    # epochs on the transfer set.
    "gpu": dict(archs=["vit_tiny/4", "vit_small/4"], img_size=32, subset_per_class=0, epochs=100, batch_size=512,
                warmup_epochs=10, knn_every=10, workers=8, seeds=1, unseen_seeds=1, finetune_lr=5e-4,
                transfer_finetune_epochs=100),
    # The gpu protocol cut down to finish in under 8 minutes on one H100, sized by estimate (not measured: the
    # data loaders, ~5,000 two-view images/s on 8 workers, bound the step): the cpu protocol's 10,000 images, 15
    # epochs, batch 256 (39 steps an epoch rather than 19 at 512), ViT-Tiny/4 only. If it runs over, lower --epochs.
    "gpu-quick": dict(archs=["vit_tiny/4"], img_size=32, subset_per_class=1000, epochs=15, batch_size=256,
                      warmup_epochs=1, knn_every=5, workers=8, seeds=1, unseen_seeds=1, finetune_lr=1e-3,
                      transfer_finetune_epochs=25),
}


def split_arch(text):
    """'vit_mini/8' -> ('vit_mini', 8); a one-line error for anything else."""
    name, _, patch = text.partition("/")
    if name not in vit.ARCHS or not patch.isdigit():
        raise SystemExit(f"--archs {text}: expected <arch>/<patch size> with arch one of {', '.join(vit.ARCHS)}, "
                         f"e.g. vit_tiny/4")
    return name, int(patch)


def resolve_cfg(args):
    """The protocol's settings with the command line's overrides; archs as 'name/patch' strings."""
    cfg = dict(PROTOCOLS[args.protocol])
    for k in ("img_size", "epochs", "batch_size", "warmup_epochs", "knn_every", "subset_per_class", "seeds",
              "unseen_seeds", "workers", "finetune_lr", "transfer_finetune_epochs"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.archs:
        cfg["archs"] = [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.arch is not None or args.patch_size is not None:  # one shape, the first one's where not given
        first = split_arch(cfg["archs"][0])
        cfg["archs"] = [f"{args.arch or first[0]}/{args.patch_size or first[1]}"]
    for a in cfg["archs"]:
        if cfg["img_size"] % split_arch(a)[1]:
            raise SystemExit(f"--img-size {cfg['img_size']} is not a multiple of the patch size of {a}")
    cfg["unseen_seeds"] = min(cfg["unseen_seeds"] or cfg["seeds"], cfg["seeds"])
    cfg["supervised_epochs"] = args.supervised_epochs or cfg["epochs"]
    return cfg


def method_flags(method, cfg):
    """The flags a method gets beyond the shared ones: what SwAV's and DINO's files size for 100+ epochs of all
    of CIFAR-10 at 32 px, sized to the protocol: the small crops' side, SwAV's queue, DINO's lr in short runs."""
    if method not in ("swav", "dino"):
        return []
    small = max(cfg["patch_size"], cfg["img_size"] // 2 // cfg["patch_size"] * cfg["patch_size"])  # 32 -> 16 px
    if method == "dino":
        # a quarter of the paper's lr in short runs: in the cpu protocol (195 steps) 5e-4 left the k-NN at 28.9,
        # 1.25e-4 gave 29.8 (untrained 28.6; dino.py's parser comments have the measurements)
        return ["--small-crop-size", str(small), *(["--lr", "1.25e-4"] if cfg["epochs"] < 50 else [])]
    long_run = cfg["epochs"] >= 50  # the queue starts at epoch 15 (of the reference's 200): only in long runs
    return ["--small-crop-size", str(small),
            # the reference freezes the prototypes for its first epoch, as the file's default does on any data
            # (written out so that the study's commands show it)
            "--freeze-prototypes-epochs", "1",
            *(["--queue", "3840", "--queue-start-epoch", "15"] if long_run else ["--queue", "0"])]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=[*sorted(PROTOCOLS), "few-label"], default="cpu",
                   help="settings preset, PROTOCOLS at the top of this file; few-label: the few-label study "
                        "(benchmarks/few_label.py, its FEW_LABEL settings) (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="study folder (default: runs/study; runs/few_label for --protocol few-label)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder"],
                   help="pretraining data: a torchvision dataset, fetched into --data-dir when missing and written "
                        "once as an ImageFolder tree of PNGs under <out>/data (the subsets are made from it), or "
                        "folder: the ImageFolder tree (train/ and test/) at --data-dir (default: %(default)s)")
    p.add_argument("--data-dir", default="data",
                   help="torchvision's download folder, or the folder tree (default: %(default)s)")
    p.add_argument("--transfer-dataset", default="folder", choices=["folder", "cifar10", "cifar100", "stl10"],
                   help="transfer target (default: %(default)s)")
    p.add_argument("--transfer-data-dir", "--transfer-dir", dest="transfer_data_dir",
                   default=os.path.join("data", "tinyimagenet20"),
                   help="its root (default: %(default)s: 20 Tiny ImageNet classes, built by "
                        "benchmarks/tinyimagenet20.py from the Tiny ImageNet archive when missing, the archive "
                        "fetched into --data-dir; or e.g. --transfer-dataset cifar100 --transfer-data-dir data)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch missing datasets (torchvision's, the Tiny ImageNet archive) (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="default: all five (few-label: simclr swav)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 of every run: mean ± std (default: protocol)")
    p.add_argument("--no-unseen", action="store_true",
                   help="skip the five-class pretrainings and the unseen-classes columns (a third of the cost)")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning columns")
    p.add_argument("--supervised-epochs", type=int, default=None,
                   help="the supervised baseline's epochs, and the CIFAR-10 fine-tuning's (default: --epochs; "
                        "more: the same wall-clock as a pretraining, since its epoch costs less)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--workers", type=int, default=None, help="data loading processes (default: protocol)")
    g = p.add_argument_group("overrides of the protocol (tests, smaller or longer studies)")
    g.add_argument("--archs", default=None, metavar="A/P,...",
                   help="the ViT shapes, each a study of its own under <out>/<arch>-<patch>/, e.g. "
                        "vit_mini/8,vit_tiny/4 (default: the protocol's)")
    notes = {"subset-per-class": " (0: all train images)", "arch": " (one shape; with --patch-size: see --archs)",
             "unseen-seeds": " (the five-class pretrainings for seeds 0..N-1 only)",
             "finetune-lr": " (AdamW, per 256 images)", "transfer-finetune-epochs": " (fine-tuning on the transfer set)"}
    for flag, kind in (("arch", str), ("patch-size", int), ("img-size", int), ("epochs", int), ("batch-size", int),
                       ("warmup-epochs", int), ("knn-every", int), ("subset-per-class", int), ("unseen-seeds", int),
                       ("finetune-lr", float), ("transfer-finetune-epochs", int)):
        g.add_argument(f"--{flag}", type=kind, default=None, choices=sorted(vit.ARCHS) if flag == "arch" else None,
                       help="default: the protocol's" + notes.get(flag, ""))
    g = p.add_argument_group("the few-label protocol (--protocol few-label; its defaults: few_label.FEW_LABEL)")
    g.add_argument("--labels", type=lambda t: [int(x) for x in t.split(",")], default=None, metavar="N,N",
                   help="the label counts, e.g. 500,5000 (default: the protocol's)")
    g.add_argument("--search-epochs", type=lambda t: [int(x) for x in t.split(",")], default=None, metavar="E,E,E",
                   help="the recipe search's epoch grid for every label count, not doubled beyond its longest "
                        "(default: the protocol's)")
    g.add_argument("--search-lrs", type=lambda t: [float(x) for x in t.split(",")], default=None, metavar="LR,LR",
                   help="the recipe search's lr grid, per 256 images (default: the protocol's)")
    g.add_argument("--search-batch-size", type=int, default=None, help="the few-label runs' batch (default: the "
                                                                      "protocol's per label count)")
    g.add_argument("--full-finetune-epochs", type=int, default=None,
                   help="fine-tune the pretrained networks on all labels too, for this many epochs (default: 0, off)")
    g.add_argument("--monitor-val-fraction", type=float, default=None,
                   help="the pretrainings' k-NN monitor: this fraction of train held out as its queries "
                        "(default: the protocol's)")
    g.add_argument("--no-transfer", action="store_true", help="skip the few-label transfer row")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit; writes nothing")
    p.add_argument("--no-figures", action="store_true", help="results and table only")
    p.add_argument("--docs", action="store_true", help="also copy the figures to docs/ (docs/study.md shows them)")
    return p


# ---- paths ----

def shown(path):
    """A path as the printed commands give it: relative to the repository root (where they run) when it is in the
    repository or in the folder that holds it, else absolute."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return path if rel.startswith(os.path.join("..", "..")) else rel


def command_line(cmd):
    return "python " + shlex.join(cmd[1:])


def ckpt_state(path):
    """(epoch, args, mtime) of a checkpoint, or None. mmap: MoCo's file holds two networks and the optimizer."""
    if not os.path.exists(path):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return ckpt.get("epoch"), ckpt.get("args") or {}, os.stat(path).st_mtime_ns


# ---- data trees ----

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}


def export_folder(name, root, dst, download, dry_run):
    """The train and test splits of torchvision's `name` (fetched into `root` when missing and `download`) written
    once as an ImageFolder tree of lossless PNGs, dst/{train,test}/<class>/<index>.png: the same pixels, which
    the study's subsets link to and the method files read as --dataset folder. Built into dst.tmp, then renamed."""
    if os.path.isdir(os.path.join(dst, "train")):
        return dst
    print(f"[study] {name} from {root} as an ImageFolder tree of PNGs: {shown(dst)}", flush=True)
    if dry_run:
        return dst
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "test"):
        ds = data.build_dataset(name, root, split, download=download)  # (PIL image, label) pairs
        for c in ds.classes:
            os.makedirs(os.path.join(tmp, split, c))
        for i in tqdm(range(len(ds)), desc=f"{name} {split} -> png", dynamic_ncols=True):
            img, label = ds[i]
            img.save(os.path.join(tmp, split, ds.classes[label], f"{i:05d}.png"))
    os.replace(tmp, dst)
    return dst

def class_files(root, split):
    d = os.path.join(root, split)
    return {c: sorted(os.listdir(os.path.join(d, c))) for c in sorted(os.listdir(d))
            if os.path.isdir(os.path.join(d, c))}


def subset_files(files, per_class, seed=0):
    """A fixed stratified subset: per class, `per_class` files drawn with `seed` from the sorted list (0: all)."""
    if not per_class:
        return files
    return {c: sorted(random.Random(f"{seed}-{c}").sample(fs, min(per_class, len(fs)))) for c, fs in files.items()}


def build_tree(dst, src, classes, per_class, seed=0, dry_run=False):
    """An ImageFolder tree of symlinks: train/<class>/ holds `per_class` images of each class drawn with `seed` (0:
    the whole class folder), test/<class>/ the whole test folder of each class. Built once; tree.json says from
    what."""
    manifest = {"source": os.path.realpath(src), "classes": classes, "per_class": per_class, "seed": seed}
    if dry_run:
        return dst
    if os.path.exists(os.path.join(dst, "tree.json")):
        with open(os.path.join(dst, "tree.json")) as f:
            if json.load(f) != manifest:
                raise SystemExit(f"{dst} was built from other data ({f.name}): use another --out")
        return dst
    if os.path.exists(dst):  # a tree whose building was interrupted (symlinks only: nothing else is removed)
        shutil.rmtree(dst)
    files = subset_files({c: fs for c, fs in class_files(src, "train").items() if c in classes}, per_class, seed)
    os.makedirs(os.path.join(dst, "train"))
    os.makedirs(os.path.join(dst, "test"))
    for c in classes:
        if per_class:
            os.makedirs(os.path.join(dst, "train", c), exist_ok=True)
            for fname in files[c]:
                os.symlink(os.path.realpath(os.path.join(src, "train", c, fname)), os.path.join(dst, "train", c, fname))
        else:
            os.symlink(os.path.realpath(os.path.join(src, "train", c)), os.path.join(dst, "train", c))
        os.symlink(os.path.realpath(os.path.join(src, "test", c)), os.path.join(dst, "test", c))
    with open(os.path.join(dst, "tree.json"), "w") as f:  # last: a tree without it is rebuilt
        json.dump(manifest, f)
    return dst


# ---- the plan ----

def arch_tag(arch):
    """'vit_tiny/4' -> 'vit_tiny-4': the folder of one shape's study when there are several."""
    return arch.replace("/", "-")


def make_plan(args, arch=None):
    """The resolved settings and every network of the study of one ViT shape (`arch`, 'name/patch'; default the
    first of the protocol's), as plain dicts (also written to study.json). With several shapes each has its own
    folder <out>/<arch>-<patch>/; the data trees are shared, under <out>/data."""
    cfg = resolve_cfg(args)
    arch = arch or cfg["archs"][0]
    cfg["arch"], cfg["patch_size"] = split_arch(arch)
    top = os.path.abspath(args.out or "runs/study")
    out = top if len(cfg["archs"]) == 1 else os.path.join(top, arch_tag(arch))
    data_root = os.path.join(top, "data")
    if args.dataset == "folder":
        src = os.path.abspath(args.data_dir)
        if not os.path.isdir(os.path.join(src, "train")):
            raise SystemExit(f"--data-dir {args.data_dir}: expected an ImageFolder tree with train/<class>/ and test/")
    else:  # the subsets below are symlink trees: the torchvision dataset becomes a folder tree first
        src = export_folder(args.dataset, args.data_dir, os.path.join(data_root, args.dataset), args.download,
                            args.dry_run)
    if args.transfer_dataset == "folder" and not os.path.isdir(args.transfer_data_dir):
        if os.path.basename(os.path.normpath(args.transfer_data_dir)) != "tinyimagenet20":
            raise SystemExit(f"--transfer-data-dir {args.transfer_data_dir} does not exist (an ImageFolder tree with "
                             f"train/ and test/; or --transfer-dataset cifar100)")
        print(f"[study] transfer target: python benchmarks/tinyimagenet20.py --out {args.transfer_data_dir} "
              f"--archive-dir {args.data_dir}", flush=True)
        if not args.dry_run:
            tinyimagenet20.build(args.transfer_data_dir, download=args.download, archive_dir=args.data_dir)
    have_tree = os.path.isdir(os.path.join(src, "train"))  # not yet in a dry run before the export
    # without the tree the class names are not known yet, only how many there are
    classes = (sorted(class_files(src, "train")) if have_tree
               else [f"class{i}" for i in range(NUM_CLASSES[args.dataset])])
    seen, unseen = classes[:len(classes) // 2], classes[len(classes) // 2:]   # CIFAR-10: airplane..deer | dog..truck
    n, unseen_seeds = cfg["subset_per_class"], 0 if args.no_unseen else cfg["unseen_seeds"]
    tag = f"{n}pc" if n else "all"

    def seed_trees(seed):  # each seed draws its own subsets (seed 0's folders keep their names without _s0)
        at = (lambda name: os.path.join(data_root, name + (f"_s{seed}" if n and seed else "")))
        trees = {
            "eval": src,  # pretraining effect and label efficiency: all train labels, all test images
            "pretrain": build_tree(at(f"train_{tag}"), src, classes, n, seed, args.dry_run) if n else src}
        if seed < unseen_seeds:
            trees["seen"] = build_tree(at(f"seen{len(seen)}_{tag}"), src, seen, n, seed, args.dry_run)
            # evaluation on the classes pretraining never saw: the same number of labelled images per class
            trees["unseen"] = build_tree(at(f"unseen{len(unseen)}_{tag}"), src, unseen, n, seed, args.dry_run)
        return trees

    trees = {seed: seed_trees(seed) for seed in range(cfg["seeds"])}
    num_images = {"pretrain": None, "seen": None}  # (unknown in a dry run before the export; equal for every seed)
    if have_tree:
        counts = {c: len(fs) for c, fs in subset_files(class_files(src, "train"), n).items()}
        num_images = {"pretrain": sum(counts.values()), "seen": sum(counts[c] for c in seen)}
    asked = args.methods or METHODS
    missing = [m for m in asked if not os.path.exists(os.path.join(ROOT, f"{m}.py"))]
    for m in missing:
        print(f"note: {m}.py does not exist (yet): the study runs without it")
    methods = [m for m in asked if m not in missing]
    device = [] if args.device is None else ["--device", args.device]

    models = []  # every network; "part": main (all classes) or unseen (pretrained on the seen classes)
    for seed in range(cfg["seeds"]):
        models.append(dict(name=f"random_s{seed}", model="random", seed=seed, part="main"))
        for part, tree, suffix in (("main", "pretrain", ""), ("unseen", "seen", str(len(seen)))):
            if part == "unseen" and seed >= unseen_seeds:
                continue
            data_dir = trees[seed][tree]
            models.append(dict(name=f"supervised{suffix}_s{seed}", model="supervised", seed=seed, part=part,
                               data_dir=data_dir, num_images=num_images[tree]))
            for m in methods:
                run_dir = os.path.join(out, "runs", f"{m}{suffix}_s{seed}")
                cmd = [sys.executable, f"{m}.py", "--dataset", "folder", "--data-dir", shown(data_dir),
                       "--arch", cfg["arch"], "--patch-size", str(cfg["patch_size"]),
                       "--img-size", str(cfg["img_size"]),
                       "--epochs", str(cfg["epochs"]), "--batch-size", str(cfg["batch_size"]),
                       "--warmup-epochs", str(cfg["warmup_epochs"]), "--workers", str(cfg["workers"]),
                       "--knn-every", str(cfg["knn_every"] if part == "main" else 0), "--seed", str(seed),
                       *device, *method_flags(m, cfg), "--out", shown(run_dir)]
                models.append(dict(name=f"{m}{suffix}_s{seed}", model=m, seed=seed, part=part, cmd=cmd,
                                   data_dir=data_dir, num_images=num_images[tree]))
    for m in models:
        m["run_dir"] = os.path.join(out, "runs", m["name"])
        m["ckpt"] = os.path.join(m["run_dir"], "checkpoint.pt")
        m["trees"] = trees[m["seed"]]
        m["evals"] = []
        if m["part"] == "main":  # fine-tuning on CIFAR-10: random init's is the supervised baseline itself
            tunes = [] if args.no_finetune else [*(["finetune"] if "cmd" in m else []), "finetune_transfer"]
            m["evals"] = ["cifar10", "transfer", *tunes]
        if m["model"] == "random" and m["seed"] < unseen_seeds:
            m["evals"].append("unseen")  # the untrained network is the same whatever it would have seen
        if m["part"] == "unseen":
            m["evals"] = ["unseen"]
    return dict(protocol=args.protocol, cfg=cfg, arch=arch, out=out, trees=trees[0], classes=classes, seen=seen,
                unseen=unseen, num_images=num_images, methods=methods, models=models, no_unseen=args.no_unseen,
                no_finetune=args.no_finetune,
                unseen_seeds=unseen_seeds,
                transfer=dict(dataset=args.transfer_dataset, data_dir=args.transfer_data_dir, download=args.download),
                device=args.device)


# ---- pretraining ----

def check_settings(model, state, cfg, check_epoch=True):
    """A checkpoint found in the study folder must be of this study's settings: skipping or resuming a run of
    another batch size or data would put a wrong number in the table."""
    epoch, ckpt_args, _ = state
    want = {"arch": cfg["arch"], "patch_size": cfg["patch_size"], "img_size": cfg["img_size"], "seed": model["seed"]}
    if model["model"] != "random":
        want["batch_size"] = cfg["batch_size"]
    diff = [f"{k} {ckpt_args.get(k)} (study: {v})" for k, v in want.items() if ckpt_args.get(k) != v]
    # the methods store --data-dir as the study gave it, relative to the repository root where they ran
    trained_on = ckpt_args.get("data_dir") and os.path.realpath(os.path.join(ROOT, ckpt_args["data_dir"]))
    if trained_on and trained_on != os.path.realpath(model["data_dir"]):
        diff.append(f"data {ckpt_args['data_dir']} (study: {shown(model['data_dir'])})")
    if check_epoch and epoch > cfg["epochs"]:
        diff.append(f"epoch {epoch} (study: {cfg['epochs']} epochs)")
    if diff:
        raise SystemExit(f"{model['ckpt']} is of another study: {', '.join(diff)}; delete {model['run_dir']} or "
                         f"choose another --out")


def log_cost(run_dir):
    """(training seconds, images/s) from a run's log.jsonl: the epochs' own times, without start-up and the k-NN
    monitor; images/s counts images, each with all its views."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        lines = [json.loads(s) for s in f if s.strip()]
    lines = [r for r in lines if r["epoch"] > 0]  # epoch 0: the untrained network's k-NN, no training
    seconds = sum(r["seconds"] for r in lines)
    images = sum(r["img_per_s"] * r["seconds"] for r in lines)
    return seconds, images / max(seconds, 1e-9)


def pretrain(model, cfg, dry_run):
    """Run (or skip, or resume) one method's pretraining through its own CLI. Returns True if it trained now."""
    state = ckpt_state(model["ckpt"])
    cmd = list(model["cmd"])
    if state is not None:
        check_settings(model, state, cfg)
        if state[0] == cfg["epochs"]:
            print(f"[study] {model['name']}: complete ({state[0]}/{cfg['epochs']} epochs), skipped")
            return False
        cmd.append("--resume")
        print(f"[study] {model['name']}: resuming after epoch {state[0]} of {cfg['epochs']}")
    print(f"[study] {model['name']}: {command_line(cmd)}", flush=True)
    if dry_run:
        return False
    if state is None and os.path.exists(os.path.join(model["run_dir"], "log.jsonl")):
        os.remove(os.path.join(model["run_dir"], "log.jsonl"))  # the log of a deleted checkpoint: not this run's
    t0, c0 = time.time(), cpu_seconds(children=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise RuntimeError(f"{model['name']} failed: {command_line(cmd)}")
    model["wall_seconds"], model["cpu_seconds"] = time.time() - t0, cpu_seconds(children=True) - c0
    model["resumed"] = state is not None  # then both cover the resumed part only
    return True


def save_baseline(path, backbone, method, epoch, args, **extra):
    """A baseline as a checkpoint of the repo's format, so eval_linear.load_backbone and the figures read it like
    the methods' (no optimizer: a baseline is never resumed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"method": method, "epoch": epoch, "args": args, "vit_kwargs": backbone.kwargs,
                "backbone": backbone.state_dict(), **extra}, path + ".tmp")
    os.replace(path + ".tmp", path)


def random_init(model, cfg, dry_run):
    """The untrained ViT, built exactly as `eval_linear.py --random-init --arch ... --seed s` builds it (and as every
    method's run of the same seed starts). Its args carry no dataset: evaluated, it normalizes like the data."""
    print(f"[study] {model['name']}: the untrained {cfg['arch']}/{cfg['patch_size']}, seed {model['seed']}")
    state = ckpt_state(model["ckpt"])
    if state is not None:
        check_settings(model, state, cfg)
    if dry_run or state is not None:
        return False
    torch.manual_seed(model["seed"])
    backbone = vit.ARCHS[cfg["arch"]](img_size=cfg["img_size"], patch_size=cfg["patch_size"])
    save_baseline(model["ckpt"], backbone, "random init", 0,
                  {"arch": cfg["arch"], "patch_size": cfg["patch_size"], "img_size": cfg["img_size"],
                   "seed": model["seed"]})
    return True


def supervised_command(model, cfg):
    """The eval_linear command that trains the same network the same way and prints its fine-tune top-1."""
    return ["python", "eval_linear.py", "--random-init", "--arch", cfg["arch"], "--patch-size", str(cfg["patch_size"]),
            "--img-size", str(cfg["img_size"]), "--dataset", "folder", "--data-dir", shown(model["data_dir"]),
            "--no-probe", "--finetune", "--finetune-epochs", str(cfg["supervised_epochs"]),
            "--finetune-lr", f"{cfg['finetune_lr']:g}",
            "--batch-size", str(cfg["batch_size"]), "--workers", str(cfg["workers"]), "--seed", str(model["seed"])]


def train_eval(backbone, aug_set, eval_set, spec, mean_std, epochs, lr, batch_size, workers, seed, device,
               eval_batch_size=None):
    """eval_linear.finetune of `backbone` + a linear head on `aug_set` (a train split, or a Subset of one: its views
    by `spec`, a function of the image side giving a data.ViewSpec), top-1 on `eval_set`: the same seeds, loaders and
    order of calls as `eval_linear.py ... --finetune` (so its CLI trains the same network where `spec` is
    data.finetune_spec). lr per 256 images; the evaluation batch is eval_batch_size, else batch_size (the CLI's).
    Returns dict(top1, top5, net: the fine-tuned nn.Sequential(backbone, head), seconds and cpu_seconds (wall-clock
    and CPU time of the training and its one pass over eval_set), images_per_epoch (trained on: the loader drops
    the last partial batch))."""
    size = backbone.kwargs["img_size"]
    aug = data.build_train_loader(aug_set, [spec(size)], *mean_std, batch_size, workers, device, seed=seed)
    evaluation = data.build_eval_loader(eval_set, size, *mean_std, eval_batch_size or batch_size, workers)
    torch.manual_seed(seed)
    t0, c0 = time.time(), cpu_seconds()
    result, net = eval_linear.finetune(backbone, aug, evaluation, data.num_classes(data._base(aug_set)[0]), epochs,
                                       lr * batch_size / 256, device)  # scaled by the batch as the CLI scales it
    return dict(top1=result["top1"], top5=result["top5"], net=net, seconds=time.time() - t0,
                cpu_seconds=cpu_seconds() - c0, images_per_epoch=len(aug) * batch_size)


def run_finetune(backbone, dataset, data_dir, mean_std, epochs, cfg, seed, device, download=True):
    """train_eval on a dataset's whole train split (eval_linear's fine-tuning views), top-1 on its test split, at
    the protocol's lr, batch and workers (the test split read 256 at a time). Returns train_eval's dict with
    num_classes and num_test."""
    aug_set = data.build_dataset(dataset, data_dir, "train", download=download)
    test_set = data.build_dataset(dataset, data_dir, "test", download=download)
    run = train_eval(backbone, aug_set, test_set, data.finetune_spec, mean_std, epochs, cfg["finetune_lr"],
                     cfg["batch_size"], cfg["workers"], seed, device, eval_batch_size=256)
    return {**run, "num_classes": data.num_classes(aug_set), "num_test": len(test_set)}


def supervised(model, cfg, device, dry_run):
    """The supervised baseline: eval_linear's fine-tuning from random init (`eval_linear.py --random-init
    --finetune`) on the pretraining images for the same epochs and batch, in this process so that the trained
    backbone is kept (the CLI keeps only its accuracy). Same seeds and order of calls as the CLI: same network."""
    cmd = supervised_command(model, cfg)
    state = ckpt_state(model["ckpt"])
    if state is not None:
        check_settings(model, state, cfg, check_epoch=False)
        if state[0] == cfg["supervised_epochs"]:
            print(f"[study] {model['name']}: complete ({plural(cfg['supervised_epochs'], 'epoch')}), skipped")
            return False
        print(f"[study] {model['name']}: trained for {plural(state[0], 'epoch')}, the study asks for "
              f"{cfg['supervised_epochs']}: training it again")
    print(f"[study] {model['name']}: {command_line(cmd)} (in this process)", flush=True)
    if dry_run:
        return False
    torch.manual_seed(model["seed"])
    backbone = vit.ARCHS[cfg["arch"]](img_size=cfg["img_size"], patch_size=cfg["patch_size"])
    run = run_finetune(backbone, "folder", model["data_dir"], data.MEAN_STD["folder"], cfg["supervised_epochs"], cfg,
                       model["seed"], device)
    net, seconds = run["net"], run["seconds"]
    net[0].cpu()
    save_baseline(model["ckpt"], net[0], "supervised", cfg["supervised_epochs"],
                  {"dataset": "folder", "data_dir": model["data_dir"], "arch": cfg["arch"],
                   "patch_size": cfg["patch_size"], "img_size": cfg["img_size"], "epochs": cfg["supervised_epochs"],
                   "batch_size": cfg["batch_size"], "lr": cfg["finetune_lr"] * cfg["batch_size"] / 256,
                   "seed": model["seed"]},
                  head=net[1].state_dict(), finetune_top1=run["top1"], finetune_top5=run["top5"],
                  seconds=seconds, cpu_seconds=run["cpu_seconds"],
                  img_per_s=run["images_per_epoch"] * cfg["supervised_epochs"] / seconds)
    return True


# ---- evaluation ----

FINETUNES = ("finetune", "finetune_transfer")  # the evaluations that fine-tune (the others read frozen features)


def eval_setting(plan, model, name):
    """(dataset, data_dir, eval_data label) of one evaluation."""
    trees = model["trees"]
    if name == "cifar10":
        return "folder", trees["eval"], f"folder:{os.path.basename(os.path.normpath(trees['eval']))}"
    if name == "finetune":  # the labels of the pretraining images: the supervised baseline's data and budget
        return "folder", trees["pretrain"], f"folder:{os.path.basename(os.path.normpath(trees['pretrain']))}"
    if name == "unseen":
        return "folder", trees["unseen"], "unseen classes: " + ", ".join(plan["unseen"])
    t = plan["transfer"]
    label = f"folder:{os.path.basename(os.path.normpath(t['data_dir']))}" if t["dataset"] == "folder" else t["dataset"]
    return t["dataset"], t["data_dir"], label


def finetune_epochs(plan, name):
    return plan["cfg"]["supervised_epochs"] if name == "finetune" else plan["cfg"]["transfer_finetune_epochs"]


def eval_command(plan, model, name):
    """The eval_linear command that gives the row's k-NN and full-label linear numbers, or its fine-tune top-1."""
    cfg = plan["cfg"]
    dataset, data_dir, _ = eval_setting(plan, model, name)
    if model["model"] == "random":
        who = ["--random-init", "--arch", cfg["arch"], "--patch-size", str(cfg["patch_size"]),
               "--img-size", str(cfg["img_size"])]
    else:
        who = ["--ckpt", shown(model["ckpt"])]
    extra = ["--no-download"] if not plan["transfer"]["download"] and dataset != "folder" else []
    if name in FINETUNES:
        extra += ["--no-probe", "--finetune", "--finetune-epochs", str(finetune_epochs(plan, name)),
                  "--finetune-lr", f"{cfg['finetune_lr']:g}", "--batch-size", str(cfg["batch_size"]),
                  "--workers", str(cfg["workers"])]
    return ["python", "eval_linear.py", *who, "--dataset", dataset, "--data-dir", shown(data_dir), *extra,
            "--seed", str(model["seed"])]


def finetune_eval(plan, model, name, device):
    """One fine-tuning row: the network and a new linear head trained end to end (eval_linear.finetune) on the
    pretraining images' labels for the supervised baseline's epochs (finetune), or on the transfer set
    (finetune_transfer); top-1 on the test split. The pretraining normalization, as the frozen evaluations."""
    cfg = plan["cfg"]
    dataset, data_dir, label = eval_setting(plan, model, name)
    backbone, meta = eval_linear.load_backbone(model["ckpt"])
    mean_std = tuple(map(tuple, meta["mean_std"] or data.MEAN_STD[dataset]))
    epochs = finetune_epochs(plan, name)
    run = run_finetune(backbone, dataset, data_dir, mean_std, epochs, cfg, model["seed"], device,
                       plan["transfer"]["download"])
    seconds = run["seconds"]
    row = dict(kind="eval", run=model["name"], model=model["model"], seed=model["seed"], part=model["part"],
               eval=name, eval_data=label, dataset=dataset, data_dir=data_dir, num_classes=run["num_classes"],
               images_per_epoch=run["images_per_epoch"], num_test=run["num_test"], img_size=backbone.kwargs["img_size"],
               finetune_top1=run["top1"], finetune_top5=run["top5"], finetune_epochs=epochs,
               finetune_lr=cfg["finetune_lr"], seconds=round(seconds, 1), cpu_seconds=round(run["cpu_seconds"], 1),
               cpu=cpu_model(), device=str(device), ckpt=model["ckpt"],
               ckpt_epoch=meta["epoch"], ckpt_mtime=os.stat(model["ckpt"]).st_mtime_ns,
               command=shlex.join(eval_command(plan, model, name)), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    print(f"[study] {model['name']} fine-tuned on {label}: {run['top1']:.2f} [{seconds:.0f} s]", flush=True)
    return row


def subset_indices(dataset, tree):
    """Indices into `dataset` (an ImageFolder) of the images of `tree`'s train split (same class and file name):
    the pretraining subset inside the full train features."""
    keep = {(c, f) for c, fs in class_files(tree, "train").items() for f in fs}
    return torch.tensor([i for i, (path, _) in enumerate(dataset.samples)
                         if (os.path.basename(os.path.dirname(path)), os.path.basename(path)) in keep])


def evaluate(plan, model, name, device):
    """One evaluation row: eval_linear's k-NN and linear probe on frozen features extracted once, with the
    probes on the labelled subsets for CIFAR-10. The same calls, defaults and seeds as eval_linear's main()."""
    cfg = plan["cfg"]
    dataset, data_dir, label = eval_setting(plan, model, name)
    backbone, meta = eval_linear.load_backbone(model["ckpt"])
    img_size = meta["vit_kwargs"]["img_size"]                   # the pretraining resolution (eval_linear's default)
    mean_std = tuple(map(tuple, meta["mean_std"] or data.MEAN_STD[dataset]))  # the pretraining normalization
    download = plan["transfer"]["download"]
    train_set = data.build_dataset(dataset, data_dir, "train", download=download)
    test_set = data.build_dataset(dataset, data_dir, "test", download=download)
    num_classes = data.num_classes(train_set)
    t0, c0 = time.time(), cpu_seconds()
    backbone.to(device)
    feats = {}
    for split, ds in (("train", train_set), ("test", test_set)):
        loader = data.build_eval_loader(ds, img_size, *mean_std, 256, cfg["workers"])  # eval_linear's --batch-size
        feats[split] = eval_linear.extract_features(backbone, loader, device)
    (xtr, ytr), (xte, yte) = feats["train"], feats["test"]
    seed = model["seed"]
    knn1, knn5 = eval_linear.knn_accuracy(xtr, ytr, xte, yte, num_classes)          # k=20, T=0.07
    probe = eval_linear.linear_probe(xtr, ytr, xte, yte, num_classes, seed=seed)     # 100 epochs, SGD 0.1
    row = dict(kind="eval", run=model["name"], model=model["model"], seed=seed, part=model["part"], eval=name,
               eval_data=label, dataset=dataset, data_dir=data_dir, num_classes=num_classes, num_train=len(ytr),
               num_test=len(yte), img_size=img_size, knn_top1=knn1, knn_top5=knn5, linear_top1=probe["top1"],
               linear_top5=probe["top5"], command=shlex.join(eval_command(plan, model, name)))
    if name == "cifar10":
        for frac in LABEL_FRACTIONS:
            _, idx = eval_linear.stratified_split(ytr.cpu(), frac, seed=LABEL_SUBSET_SEED)
            idx = idx.to(xtr.device)
            sub = eval_linear.linear_probe(xtr[idx], ytr[idx], xte, yte, num_classes, seed=seed)
            row[f"linear_{frac:g}_top1"], row[f"num_{frac:g}"] = sub["top1"], len(idx)
            # the CLI draws the same labelled images (stratified_split's held-out part) and probes them alone
            row[f"command_linear_{frac:g}"] = shlex.join(eval_command(plan, model, name) + [
                "--label-fraction", f"{frac:g}", "--label-seed", str(LABEL_SUBSET_SEED)])
        if model["model"] == "random":  # the k-NN every run's log starts from: its memory bank is the pretraining set
            idx = subset_indices(train_set, model["trees"]["pretrain"]).to(xtr.device)
            row["knn_top1_pretrain_bank"] = eval_linear.knn_accuracy(xtr[idx], ytr[idx], xte, yte, num_classes)[0]
        if model["model"] == "supervised":
            ck = torch.load(model["ckpt"], map_location="cpu", weights_only=True)
            row["finetune_top1"], row["finetune_top5"] = ck["finetune_top1"], ck["finetune_top5"]
            row["command_finetune"] = shlex.join(supervised_command(model, cfg))
    backbone.cpu()
    row.update(seconds=round(time.time() - t0, 1), cpu_seconds=round(cpu_seconds() - c0, 1), cpu=cpu_model(),
               device=str(device), ckpt=model["ckpt"],
               ckpt_epoch=meta["epoch"], ckpt_mtime=os.stat(model["ckpt"]).st_mtime_ns,
               time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    print(f"[study] {model['name']} on {label}: k-NN {knn1:.2f}, linear {probe['top1']:.2f}"
          + "".join(f", {f:g} labels {row[f'linear_{f:g}_top1']:.2f}" for f in LABEL_FRACTIONS if name == "cifar10")
          + f" [{row['seconds']:.0f} s]", flush=True)
    return row


def train_command(model, cfg):
    """The command line that trains a network: its method's script, or eval_linear's for the supervised baseline."""
    return shlex.join(supervised_command(model, cfg)) if model["model"] == "supervised" else command_line(model["cmd"])


def kept_mtime(plan, model, rows):
    """For a network whose checkpoint is gone (deleted to free the disk, or results.jsonl carried to another
    machine): the ckpt_mtime of a complete set of its rows, the training's and every evaluation's, each with the
    command the plan would run now; else None. Such a network keeps its cells and is not trained again."""
    want = {("eval", name): shlex.join(eval_command(plan, model, name)) for name in model["evals"]}
    if model["model"] != "random":
        want["pretrain", None] = train_command(model, plan["cfg"])
    found = {}  # ckpt_mtime -> the rows of `want` made from that checkpoint
    for r in rows:
        key = (r["kind"], r.get("eval"))
        if r["run"] == model["name"] and want.get(key) == r["command"]:
            found.setdefault(r["ckpt_mtime"], set()).add(key)
    return max((mtime for mtime, keys in found.items() if keys == set(want)), default=None)


def pretrain_row(plan, model):
    """The cost of one network's training (a results row)."""
    cfg = plan["cfg"]
    if model["model"] == "supervised":
        ck = torch.load(model["ckpt"], map_location="cpu", weights_only=True)
        seconds, img_per_s, epochs = ck["seconds"], ck["img_per_s"], cfg["supervised_epochs"]
        cpu_time, wall = ck.get("cpu_seconds"), ck["seconds"]
    else:
        seconds, img_per_s = log_cost(model["run_dir"])
        epochs, cpu_time, wall = cfg["epochs"], model.get("cpu_seconds"), model.get("wall_seconds")
    return dict(kind="pretrain", run=model["name"], model=model["model"], seed=model["seed"], part=model["part"],
                data_dir=model["data_dir"], num_images=model["num_images"], epochs=epochs,
                batch_size=cfg["batch_size"], seconds=seconds, img_per_s=img_per_s,
                # the whole command's wall-clock and CPU time (user + sys of the process and its children: what a
                # shared machine does not inflate); None where this invocation did not train it; resumed: they
                # cover the resumed part only
                wall_seconds=wall, cpu_seconds=cpu_time, resumed=model.get("resumed", False),
                command=train_command(model, cfg), hardware=hardware(plan["device"]), cpu=cpu_model(), cores=cores(),
                # the machines are shared: the 5-minute load average as the run ended says how much
                load_avg=round(os.getloadavg()[1], 2) if hasattr(os, "getloadavg") else None,
                ckpt=model["ckpt"], ckpt_mtime=os.stat(model["ckpt"]).st_mtime_ns,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))


# ---- the table ----

def cpu_model():
    """The CPU's model name as this machine reports it (/proc/cpuinfo on Linux, else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cores():
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_seconds(children=False):
    """User + system CPU time so far of this process and its finished children (data-loading workers), or of the
    finished children only (a training script run by subprocess, with its own workers): deltas of it are the CPU
    a piece of work cost, which a shared machine inflates far less than the wall-clock (torch's threads still spin
    while they wait for a core)."""
    try:
        import resource  # Unix
    except ImportError:
        return 0.0 if children else time.process_time()
    used = [resource.getrusage(resource.RUSAGE_CHILDREN)]
    if not children:
        used.append(resource.getrusage(resource.RUSAGE_SELF))
    return sum(u.ru_utime + u.ru_stime for u in used)


def hardware(device=None):
    """One line: GPU, CPU model, cores this process may use, torch."""
    line = f"{cpu_model()}, {cores()} cores"
    dev = eval_linear.resolve_device(device or "auto")
    if dev.type == "cuda":
        line = f"{torch.cuda.get_device_name(dev)}; {line}"
    return line + f"; torch {torch.__version__}"


def hardware_line(trained, device=None):
    """'Hardware, as each training run recorded it: <hardware> (n runs); ...' from the training rows: the machines
    they ran on, not the one re-tabulating them (this one's only where there is no row)."""
    machines = {}
    for r in trained:
        machines[r.get("hardware", "not recorded")] = machines.get(r.get("hardware", "not recorded"), 0) + 1
    return "Hardware, as each training run recorded it: " + ("; ".join(
        f"{h} ({plural(n, 'run')})" for h, n in machines.items()) if machines else hardware(device))


def mean_std(values):
    """'44.4' for one value, '44.4 ± 0.3' (sample std) for several, '-' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.1f} ± {s:.1f}"


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def duration(seconds):
    return "-" if seconds is None else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# the table's columns: (key, header); the headline columns have 3 seeds in the cpu protocol, the others may not
COLUMNS = [("knn", "CIFAR-10 k-NN"), ("linear", "linear"), ("finetune", "fine-tune"),
           *((f"linear_{f:g}", f"linear, {f:.0%} labels") for f in LABEL_FRACTIONS),
           ("unseen_knn", "unseen classes k-NN"), ("unseen_linear", "linear"),
           ("transfer_knn", "transfer k-NN"), ("transfer_linear", "linear"), ("transfer_finetune", "fine-tune"),
           ("seconds", "pretraining time"), ("cpu_seconds", "CPU time"), ("img_per_s", "img/s")]
HEADLINE = {"knn": "CIFAR-10 k-NN", "linear": "CIFAR-10 linear", "finetune": "CIFAR-10 fine-tune",
            "transfer_knn": "transfer k-NN", "transfer_linear": "transfer linear",
            "transfer_finetune": "transfer fine-tune"}
# where each column's number is: (kind, eval, key of the results row); "unseen" from the five-class networks
SOURCES = {"knn": ("eval", "cifar10", "knn_top1"), "linear": ("eval", "cifar10", "linear_top1"),
           "finetune": ("eval", "finetune", "finetune_top1"),
           **{f"linear_{f:g}": ("eval", "cifar10", f"linear_{f:g}_top1") for f in LABEL_FRACTIONS},
           "unseen_knn": ("eval", "unseen", "knn_top1"), "unseen_linear": ("eval", "unseen", "linear_top1"),
           "transfer_knn": ("eval", "transfer", "knn_top1"), "transfer_linear": ("eval", "transfer", "linear_top1"),
           "transfer_finetune": ("eval", "finetune_transfer", "finetune_top1"),
           "seconds": ("pretrain", None, "seconds"), "cpu_seconds": ("pretrain", None, "cpu_seconds"),
           "img_per_s": ("pretrain", None, "img_per_s")}
COST = ("seconds", "cpu_seconds", "img_per_s")


def idle(row):
    """Whether a training run had the machine to itself: the 5-minute load average as it ended at most its cores
    + 5% (the run keeps them busy itself; another job adds to it). It sees the last 5 minutes only; a row without a
    load average counts as idle."""
    n = row.get("cores")
    if n is None:  # rows older than the field: the hardware line says it
        found = re.search(r"(\d+) cores", row.get("hardware") or "")
        n = found and int(found.group(1))
    return row.get("load_avg") is None or not n or row["load_avg"] <= 1.05 * n


def cost_cell(latest, model, key):
    """A cost column's cell: wall-clock and images/s averaged over the model's idle training runs (all of them,
    marked 'busy', where none was idle); CPU time over every run that trained from the start (a resumed run's
    covers its last part only), which another job inflates far less than the wall-clock."""
    runs = [r for (k, _, _), r in latest.items() if k == "pretrain" and r["model"] == model and r["part"] == "main"]
    if key == "cpu_seconds":
        v = [r["cpu_seconds"] for r in runs if r.get("cpu_seconds") is not None and not r.get("resumed")]
        return duration(sum(v) / len(v)) if v else "not recorded" if runs else "-"
    quiet = [r for r in runs if idle(r)]
    v = [r[key] for r in quiet or runs]
    if not v:
        return "-"
    cell = duration(sum(v) / len(v)) if key == "seconds" else f"{sum(v) / len(v):.0f}"
    return cell + ("" if quiet else " (busy)")


def current_rows(plan, rows):
    """{(kind, run, eval): the last results row} of the study's networks from the checkpoint on disk, or where none
    is, from the checkpoint of the complete set of rows it left (kept_mtime)."""
    mtimes = {m["name"]: os.stat(m["ckpt"]).st_mtime_ns if os.path.exists(m["ckpt"]) else kept_mtime(plan, m, rows)
              for m in plan["models"]}
    latest = {}
    for r in rows:
        if mtimes.get(r["run"]) is not None and r["ckpt_mtime"] == mtimes[r["run"]]:
            latest[r["kind"], r["run"], r.get("eval")] = r
    return latest


def column_values(plan, latest):
    """{model: {column key: {seed: value}}}. Random init's CIFAR-10 fine-tune is the supervised baseline (the
    untrained network fine-tuned with the labels: the same training), so the supervised row has none of its own."""
    current = {m["name"]: m for m in plan["models"]}
    values = {}
    for model in ["random", "supervised", *plan["methods"]]:
        values[model] = {}
        for key, (kind, ev, field) in SOURCES.items():
            part = "unseen" if ev == "unseen" and model != "random" else "main"
            if model == "random" and key == "finetune":
                found = {r["seed"]: r.get("finetune_top1") for (k, run, e), r in latest.items()
                         if k == "eval" and e == "cifar10" and r["model"] == "supervised" and r["part"] == "main"}
            else:
                found = {r["seed"]: r.get(field) for (k, run, e), r in latest.items()
                         if k == kind and e == ev and current[run]["model"] == model and current[run]["part"] == part}
            values[model][key] = {seed: v for seed, v in sorted(found.items()) if v is not None}
    return values


def table_rows(plan, rows):
    """({model: [cells]} in the table's order, the current results rows), from the results rows."""
    latest = current_rows(plan, rows)
    out = {}
    for model, cols in column_values(plan, latest).items():
        cells = []
        for key, _ in COLUMNS:
            v = list(cols[key].values())
            if key.startswith("unseen") and plan["no_unseen"] or "finetune" in key and plan.get("no_finetune"):
                cells.append("not run")
            elif model == "random" and key in COST:
                cells.append("none")
            elif model == "supervised" and key == "finetune":
                cells.append("—")  # it is random init's fine-tune
            elif key in COST:
                cells.append(cost_cell(latest, model, key))
            else:
                cells.append(mean_std(v))
        out[model] = cells
    return out, latest


# ---- the reading: which differences the seeds support ----

def t_pvalue(t, df):
    """Two-sided p-value of Student's t with `df` degrees of freedom: P(|T| >= |t|) = I_x(df/2, 1/2) at
    x = df / (df + t²), the regularized incomplete beta function (Abramowitz & Stegun 26.7.1), evaluated by its
    continued fraction with Lentz's method (Numerical Recipes, 3rd ed., §6.4). Written out so that the study
    needs no scipy; tests/test_study.py checks it against the closed forms at 1 and 2 degrees of freedom (and
    scipy where installed)."""
    if math.isinf(t):
        return 0.0
    a, b, x = df / 2, 0.5, df / (df + t * t)
    if x <= 0.0 or x >= 1.0:
        return float(x >= 1.0)
    flip = x > (a + 1) / (a + b + 2)  # the fraction converges fast below the mean; use I_x(a, b) = 1 - I_1-x(b, a)
    if flip:
        a, b, x = b, a, 1.0 - x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):  # the fraction's terms d_1, d_2, ...: 1 / (1 + d_1 / (1 + d_2 / ...))
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    value = front * (f - 1.0)
    return 1.0 - value if flip else value


def paired(a, b):
    """Paired t-test of two networks' numbers over the seeds both have ({seed: value} each): (mean of a - b,
    sample std of those differences, t, two-sided p). Paired: seed s of every network shares its subset draw, so
    the seed-to-seed swing common to both cancels. Below two seeds t and p are None (one seed says nothing about
    noise); differences without any spread give t = ±inf and p = 0 (or t = 0, p = 1 when they are all 0)."""
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if len(d) < 2:
        return (d[0] if d else None), None, None, None
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    if sd == 0:
        return m, sd, (math.copysign(math.inf, m) if m else 0.0), (0.0 if m else 1.0)
    t = m / (sd / math.sqrt(len(d)))
    return m, sd, t, t_pvalue(t, len(d) - 1)


def holm(pvalues):
    """Holm's step-down adjusted p-values (Holm 1979), in the input's order: the k-th smallest of m p-values is
    multiplied by m - k + 1, then made non-decreasing along that order and capped at 1. 'Shown' where the adjusted p
    is below 5%: the chance of one or more false 'shown' among the m is at most 5% whatever their dependence."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [None] * len(pvalues), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - k) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def letters(order, differ):
    """Compact letter display (Piepho 2004, 'insert-absorb'): {name: letters} for the names in `order` (best
    first) such that two names share a letter exactly when the pair is not in `differ` (a set of frozensets: the
    pairs shown to differ). Start from one group of all; for each pair shown to differ, split every group holding
    both into one without each; drop groups inside another; letter the groups a, b, ... by their best member."""
    groups = [set(order)]
    for pair in differ:
        i, j = tuple(pair)
        split = []
        for g in groups:
            split += [g - {i}, g - {j}] if i in g and j in g else [g]
        groups = [g for k, g in enumerate(split)
                  if g and not any(g < h or (g == h and l < k) for l, h in enumerate(split))]
    rank = {n: k for k, n in enumerate(order)}
    groups.sort(key=lambda g: sorted(rank[n] for n in g))
    return {n: "".join(chr(ord("a") + k) for k, g in enumerate(groups) if n in g) for n in order}


ALPHA = 0.05  # the family-wise error rate of each column's comparisons


def column_tests(values, key):
    """Every pair of networks in one headline column: [dict(a, b, diff, t, p, p_holm, shown)], a the better
    mean, with Holm's correction over the column's pairs that have two seeds or more (the family). The networks:
    those with numbers in the column; in CIFAR-10 fine-tune random init's is the supervised baseline."""
    have = {m: v[key] for m, v in values.items() if v.get(key)}
    mean = {m: sum(v.values()) / len(v) for m, v in have.items()}
    order = sorted(have, key=lambda m: -mean[m])
    tests = []
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            d, _, t, p = paired(have[a], have[b])
            tests.append(dict(a=a, b=b, diff=d, t=t, p=p, p_holm=None, shown=False))
    family = [r for r in tests if r["p"] is not None]
    for r, adj in zip(family, holm([r["p"] for r in family])):
        r["p_holm"], r["shown"] = adj, adj < ALPHA
    return order, mean, tests


def critical_t(df, p):
    """|t| whose two-sided p-value at df degrees of freedom is p (bisection on t_pvalue): what Holm's first step
    asks of a column."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_pvalue(mid, df) > p else (lo, mid)
    return hi


def reading(plan, values):
    """What the seeds support, from the paired tests with Holm's correction within each headline column:
    a compact letter display (each network's mean and letters per column), then per column the pairs shown to
    differ and, per method, whether it is shown above (or below) random init and the supervised baseline.
    Every statement is one pair's test; no ordering is implied between networks that were not shown to differ."""
    names = dict(LABELS)
    cols = {key: column_tests(values, key) for key in HEADLINE}
    cols = {key: c for key, c in cols.items() if len(c[0]) >= 2}
    if not cols:
        return []
    seeds = max(len(v) for c in values.values() for v in c.values())
    sizes = sorted({len([r for r in t if r["p"] is not None]) for _, _, t in cols.values()})
    models = [m for m in ["random", "supervised", *plan["methods"]] if any(m in c[0] for c in cols.values())]
    lines = [f"What the {seeds} seeds support: every pair of networks in a column compared by a paired t-test over "
             f"the seeds (two-sided; seed s of every network shares its subset draw), with Holm's step-down "
             f"correction over the column's {' or '.join(map(str, sizes))} pairs: the chance of any false "
             f"'differs' in a column is at most {ALPHA:.0%} (the {len(cols)} columns are not corrected against each "
             f"other). Networks that share a letter in a column are not shown to differ ('a': the best mean's "
             f"group); in CIFAR-10 fine-tune random init's number is the supervised baseline's."
             + (f" With {seeds} seeds and {max(sizes)} pairs, Holm's first step needs |t| > "
                f"{critical_t(seeds - 1, ALPHA / max(sizes)):.1f} (p < {ALPHA / max(sizes):.4f})." if seeds > 1 else ""),
             "",
             "| | " + " | ".join(HEADLINE[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    shown = {key: letters(order, {frozenset((r["a"], r["b"])) for r in tests if r["shown"]})
             for key, (order, _, tests) in cols.items()}
    for m in models:
        cells = [f"{cols[k][1][m]:.1f} {shown[k][m]}" if m in cols[k][1] else "—" for k in cols]
        lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, (order, mean, tests) in cols.items():
        claims = [f"{names[r['a']]} > {names[r['b']]} ({r['diff']:+.1f}, t = {r['t']:.1f}, Holm p = "
                  f"{r['p_holm']:.3f})" for r in tests if r["shown"]]
        text = (f"- {HEADLINE[key]} ({len([r for r in tests if r['p'] is not None])} pairs): shown to differ: "
                + ("; ".join(claims) if claims else "none"))
        for base in ("random", "supervised"):
            if base not in mean:  # (supervised has no CIFAR-10 fine-tune of its own: random init's is it)
                continue
            verdict = {m: next(r for r in tests if {r["a"], r["b"]} == {m, base})
                       for m in plan["methods"] if m in mean}
            above = [names[m] for m, r in verdict.items() if r["shown"] and r["a"] == m]
            below = [names[m] for m, r in verdict.items() if r["shown"] and r["b"] == m]
            unshown = [names[m] for m, r in verdict.items() if not r["shown"]]
            label = "random init (= supervised)" if key == "finetune" else names[base]
            text += (f". Above {label}: {', '.join(above) or 'none'}" + (f"; below: {', '.join(below)}" if below else "")
                     + (f"; not shown: {', '.join(unshown)}" if unshown else ""))
        lines.append(text + ".")
    return lines


FINETUNE_LR_NOTE = {  # how each protocol's fine-tuning lr was chosen
    "cpu": "chosen on a 10% validation split of the pretraining images (random init and SimCLR, 5e-4 / 1e-3 / "
           "2e-3; docs/study.md), never on test, and used for the transfer set too",
    "gpu": "MAE's base lr (eval_linear's default), not chosen on a validation split for this protocol",
    "gpu-quick": "the cpu protocol's",
}


def write_table(plan, rows, argv):
    """table.md: the table, then each protocol once (sizes read off the results), the command and the hardware."""
    cfg, n, t = plan["cfg"], plan["cfg"]["subset_per_class"], plan["transfer"]
    cells, latest = table_rows(plan, rows)
    values = column_values(plan, latest)  # every seed's numbers: the reading and headline.json (the seeds figure)
    few = 0 < plan["unseen_seeds"] < cfg["seeds"]  # the unseen-classes columns of fewer seeds than the others
    headers = [h + (" (seed 0)" if few and key.startswith("unseen") and plan["unseen_seeds"] == 1 else "")
               for key, h in COLUMNS]
    lines = ["| " + " | ".join(["", *headers]) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join([LABELS[m], *c]) + " |" for m, c in cells.items()]

    def size(ev, key):  # an evaluation's size, from the untrained network's row (every network has the same)
        r = latest.get(("eval", "random_s0", ev))
        return f"{r[key]:,}" if r else "?"

    trained = [r for (k, _, _), r in latest.items() if k == "pretrain"]
    loads = [r["load_avg"] for r in trained if r.get("load_avg") is not None]
    main_runs = [r for r in trained if r["part"] == "main"]
    own = [r.get("finetune_top1") for (k, _, e), r in latest.items()
           if k == "eval" and e == "cifar10" and r["model"] == "supervised"]
    images = plan["num_images"]["pretrain"]
    pre = f"{n:,} per class, a fixed stratified subset ({images:,} images)" if n else f"all {images:,} train images"
    seen, unseen, k = ", ".join(plan["seen"]), ", ".join(plan["unseen"]), len(plan["unseen"])
    target = os.path.basename(os.path.normpath(t["data_dir"])) if t["dataset"] == "folder" else t["dataset"]
    lines += [
        "",
        f"- **Pretraining** (every row): {cfg['arch']}/{cfg['patch_size']} at {cfg['img_size']} px on CIFAR-10 "
        f"train, {pre}, {plural(cfg['epochs'], 'epoch')}, batch {cfg['batch_size']}, "
        f"{plural(cfg['warmup_epochs'], 'warmup epoch')}; each method through its own script, with its paper "
        f"defaults otherwise (commands in results.jsonl). "
        + (f"Mean ± sample std over {cfg['seeds']} seeds (each seed its own subset draw, initialization, views, "
           f"probe and fine-tuning seeds)" + (f"; the unseen-classes columns: {plural(plan['unseen_seeds'], 'seed')}."
                                              if few else ".") if cfg["seeds"] > 1 else "One seed."),
        f"- **CIFAR-10 k-NN / linear** (pretraining effect): frozen CLS features of all {size('cifar10', 'num_train')} "
        f"train images and their labels, top-1 on the {size('cifar10', 'num_test')} test images; weighted k-NN k=20, "
        f"T=0.07; linear: eval_linear's probe (100 epochs, SGD lr 0.1, cosine, standardized features).",
        f"- **1% / 10% labels** (label efficiency): the same probe trained on a fixed stratified 1% / 10% of the "
        f"train labels ({size('cifar10', 'num_0.01')} / {size('cifar10', 'num_0.1')} images, "
        f"eval_linear.stratified_split seed {LABEL_SUBSET_SEED}: `eval_linear.py ... --label-fraction 0.01 "
        f"--label-seed {LABEL_SUBSET_SEED}`), the same test images.",
    ]
    if not plan["no_unseen"]:
        lines.append(
            f"- **Unseen classes**: every network trained again on {seen} only (same images per class, epochs, "
            f"batch); k-NN / linear on the other {k} ({unseen}): {size('unseen', 'num_train')} of their train "
            f"images ({f'the same {n:,} per class' if n else 'all'}) with labels, top-1 ({k}-way) on all "
            f"{size('unseen', 'num_test')} of their test images.")
    lines += [
        f"- **Transfer**: the CIFAR-10 networks, frozen, on {target} ({size('transfer', 'num_train')} train / "
        f"{size('transfer', 'num_test')} test images, {size('transfer', 'num_classes')} classes) resized to "
        f"{cfg['img_size']} px, with the pretraining normalization; k-NN / linear as above.",
    ]
    if not plan.get("no_finetune"):
        lines.append(
            f"- **Fine-tune**: every network and a new linear head trained end to end (`eval_linear.py --finetune`: "
            f"AdamW lr {cfg['finetune_lr']:g} per 256 images, 5% warmup then cosine, weight decay 0.05, no layer "
            f"decay, random-resized-crop + flip, cross-entropy), top-1 on the test images. CIFAR-10: with the labels "
            f"of its pretraining images, the supervised baseline's budget ({plural(cfg['supervised_epochs'], 'epoch')}"
            f", batch {cfg['batch_size']}); random init's is the supervised baseline itself. Transfer: on {target}'s "
            f"train images, {plural(cfg['transfer_finetune_epochs'], 'epoch')} of "
            f"{size('finetune_transfer', 'images_per_epoch')} images (the loader drops the last partial batch). "
            "The lr: "
            + (FINETUNE_LR_NOTE[plan["protocol"]] if cfg["finetune_lr"] == PROTOCOLS[plan["protocol"]]["finetune_lr"]
               else "given on the command line") + ".")
    same = ("for the same epochs" if cfg["supervised_epochs"] == cfg["epochs"]
            else f"for {plural(cfg['supervised_epochs'], 'epoch')} (the pretrainings: {cfg['epochs']})")
    lines += [
        "- **Cost** (training on all classes): *pretraining time* is the wall-clock of the training epochs (from "
        "each run's log.jsonl, without start-up and the k-NN monitor; supervised: with its one pass over the test "
        "images) and *img/s* the images a second (each with all its views), both averaged over the runs that had "
        "the machine to themselves (5-minute load average as the run ended at most the cores + 5%: "
        f"{len([r for r in main_runs if idle(r)])} of {len(main_runs)} runs; 'busy': none was, the cell averages "
        "them all); *CPU time* is the whole command's user + system CPU time, all its processes (start-up, data "
        "decoding and the k-NN monitor included), which another job on the machine inflates far less than the "
        "wall-clock (torch's threads still spin while they wait for a core); runs recorded before the study kept it "
        "say 'not recorded'. Compare within a column, on the hardware below.",
        "- **Baselines**: *random init* is the same ViT untrained (`eval_linear.py --random-init`, same seed). "
        f"*supervised* is the same ViT trained from random init with the labels of the same images {same} "
        "and batch (`eval_linear.py --random-init --finetune`: AdamW, random-resized-crop + flip, "
        f"cross-entropy); its own classifier reaches {mean_std(own)}% top-1 on CIFAR-10 test; its columns are the "
        "same probes on its frozen features. It was trained with every label of its training images, so its 1% / 10% "
        "columns are not few-label numbers; its unseen-classes network was trained on the labels of the seen classes.",
    ]
    if cfg["seeds"] > 1:
        lines += ["", *reading(plan, values)]
    lines += [
        "",
        f"Command: `{study_command(argv)}`",
        hardware_line(trained, plan["device"])
        + (f"; 5-minute load average as each pretraining ended: {min(loads):.1f}-{max(loads):.1f}" if loads else "")
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(plan["out"], "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(plan["out"], "headline.json"), "w") as f:
        json.dump({"columns": list(HEADLINE.values()), "models": list(values),
                   "values": {m: {HEADLINE[k]: {str(s): v for s, v in values[m][k].items()} for k in HEADLINE}
                              for m in values},
                   # every pair's paired test, a the better mean (reading(): Holm within each column)
                   "pairs": {HEADLINE[k]: column_tests(values, k)[2] for k in HEADLINE}}, f, indent=1)
    return text


def study_command(argv):
    """The command that reproduces the study (without the flags that only change what else gets written)."""
    keep = [a for a in argv if a not in ("--no-figures", "--docs", "--dry-run")]
    return "python benchmarks/study.py " + shlex.join(keep) if keep else "python benchmarks/study.py"


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def run_study(args, argv, arch, device, docs=False):
    """The study of one ViT shape: train what is missing, evaluate, write the table and figures. Returns (the
    table, or None in a dry run; the names of the runs that failed)."""
    plan = make_plan(args, arch)
    cfg, out = plan["cfg"], plan["out"]
    print(f"[study] protocol {args.protocol}, {arch}: {json.dumps(cfg)}; {len(plan['models'])} networks -> "
          f"{shown(out)}")
    results = os.path.join(out, "results.jsonl")
    if not args.dry_run:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "study.json"), "w") as f:
            json.dump({**plan, "argv": argv, "command": study_command(argv)}, f, indent=1)
    rows = read_rows(results)
    failed = []

    def keep(row):  # each row as soon as it exists: a killed study keeps it
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)

    # runs on all classes first (the main columns), the five-class runs last: a study stopped early has those
    for model in sorted(plan["models"], key=lambda m: m["part"] == "unseen"):
        if not os.path.exists(model["ckpt"]) and kept_mtime(plan, model, rows) is not None:
            print(f"[study] {model['name']}: no checkpoint, but every row it needs is in results.jsonl: kept "
                  f"(delete its rows to train it again)")
            continue
        try:
            if model["model"] == "random":
                random_init(model, cfg, args.dry_run)
            elif model["model"] == "supervised":
                supervised(model, cfg, device, args.dry_run)
            else:
                pretrain(model, cfg, args.dry_run)
        except RuntimeError as e:  # one method's failure should not cost the others' hour
            print(f"[study] error: {e}", flush=True)
            failed.append(model["name"])
            continue
        mtime = None if args.dry_run else os.stat(model["ckpt"]).st_mtime_ns
        have = {(r["kind"], r.get("eval")) for r in rows if r["run"] == model["name"] and r["ckpt_mtime"] == mtime}
        if model["model"] != "random" and ("pretrain", None) not in have and not args.dry_run:
            keep(pretrain_row(plan, model))  # the pretraining's cost
        for name in model["evals"]:
            if ("eval", name) in have:
                print(f"[study] {model['name']} on {name}: in results.jsonl, skipped")
            elif args.dry_run:
                print(f"[study] {model['name']} on {name}: {shlex.join(eval_command(plan, model, name))}")
            else:
                keep((finetune_eval if name in FINETUNES else evaluate)(plan, model, name, device))
    if args.dry_run:
        return None, failed
    table = write_table(plan, rows, argv)
    print("\n" + table)
    if not args.no_figures:
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:
            sys.path.insert(0, here)
        import plots  # benchmarks/plots.py; matplotlib itself is imported only there, and only if installed
        try:
            plots.make_figures(out, docs=docs)
        except plots.NoMatplotlib as e:
            print(f"[study] figures skipped: {e}")
    return table, failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    if args.protocol == "few-label":
        import few_label  # benchmarks/few_label.py, beside this file
        return few_label.run(args, argv, eval_linear.resolve_device(args.device or "auto"))
    archs = resolve_cfg(args)["archs"]
    device = eval_linear.resolve_device(args.device or "auto")
    tables, failed = {}, []
    for arch in archs:  # one study per ViT shape, each in its own folder when there are several
        tables[arch], f = run_study(args, argv, arch, device, docs=args.docs and arch == archs[0])
        failed += f
    if args.dry_run:
        return None
    table = tables[archs[0]]
    if len(archs) > 1:  # <out>/table.md: each shape's table under its name
        table = "\n".join(f"## {arch}\n\n{tables[arch]}" for arch in archs)
        with open(os.path.join(os.path.abspath(args.out or "runs/study"), "table.md"), "w") as f:
            f.write(table)
    if failed:
        raise SystemExit(f"[study] these runs failed (see their output above): {', '.join(failed)}")
    return table


if __name__ == "__main__":
    main()

"""The few-label study (issue 31): a user has 500 or 5,000 labelled CIFAR-10 images and the rest without labels.
Should they pretrain on all the images first, and how much does it buy them? One command (the study's):

    python benchmarks/study.py --protocol few-label --docs       # over 11 h on 2 idle CPU cores (docs/study.md)
    python benchmarks/study.py --protocol few-label --dry-run    # every network and evaluation, nothing run

What it trains and measures (the settings: FEW_LABEL below; CIFAR-10's 50,000 / 10,000 images, vit_mini/8 at 32 px):
  - labels: 500 and 5,000 of the 50,000 train labels (1% and 10%, stratified: 50 / 500 per class), drawn per seed:
    seed s labels eval_linear.stratified_split(train labels, n / 50,000, seed=s)'s held-out part, the images
    `eval_linear.py --label-fraction F --label-seed s` draws; all 50,000 as the reference line.
  - supervised from scratch on the labelled images only: the same ViT from random init, eval_linear.finetune, with
    its own recipe (lr, augmentation strength, epochs) chosen on a validation split carved from seed 0's labelled
    images (20% of each class; the recipe search below), then trained on all the labelled images of each seed.
  - self-supervised on all 50,000 images without labels, about an hour of the 2-core CPU each (SimCLR 18 epochs,
    SwAV 16), through the method's own script with its k-NN monitor on a validation split of train
    (--val-fraction); pretrained once (seed 0) and shared by every label draw and seed. Then on the same labelled
    images: k-NN, the linear probe, and fine-tuning end to end (SimCLR's semi-supervised protocol, App. B.5;
    SimCLRv2 §3), its lr and epochs chosen on the same validation split by the same search.
  - all 50,000 labels: supervised for the hour (44 epochs; the study's lr, not searched again), and the
    self-supervised networks' k-NN and probe with every label; their fine-tune on all labels only with
    --full-finetune-epochs (another hour each).
  - transfer with few labels: tinyimagenet20 (100 labels per class), the hour-long networks fine-tuned and the
    same ViT trained from scratch, each with its recipe chosen on 20% of tinyimagenet20's train images.
  - cost: every run's wall-clock and CPU time (user + system, all its processes); the table puts the pretraining's
    CPU time plus the fine-tune's against the supervised run's. The search's cost is stated apart (each side
    pays for its own).
  - the learning curve of the hour: SimCLR's k-NN monitor against CPU minutes beside the supervised-on-500
    networks of the search (same monitor), plots.py's few_label_curve.png.
Seeds: --seeds (3) for the labelled cells (the label draw and the training seed); mean ± sample std, and a paired
t-test per label count between each self-supervised cell and the supervised one (seed s shares its label draw),
Holm-corrected within the label count.

The recipe search (search()), per trainer (supervised from scratch, or a pretrained network) and label count, on
seed 0's training / validation split of the labelled images, each point a complete run scored by its validation
top-1: (1) the lr grid at the middle epoch count and the default augmentation; (2) supervised from scratch only:
the other augmentation strengths at the best lr (a pretrained network is fine-tuned with crop + flip, as SimCLR
App. B.5); (3) the other epoch counts at the best lr and augmentation; (4) while the longest epoch count wins, its
double, up to the task's max_epochs. Ties go to the earlier grid point.

Resume: every finished run is a row of <out>/results.jsonl, with its command and, for a pretrained network, its
checkpoint's modification time; a row is not run again while both match. The pretrainings resume with the
method's --resume; a fine-tune or supervised run restarts.

Not built (design room): SimCLRv2's third step, distilling the fine-tuned network into the same ViT on all 50,000
unlabelled images (a `distill` trainer after final(): the teacher is the final fine-tune of a seed, kept with
--keep-networks, its soft labels on all 50,000 images the targets).
"""
import json
import math
import os
import shlex
import sys
import time

import torch
from torch.utils.data import Subset

import data
import eval_linear
import study
import vit

FEW_LABEL = dict(
    arch="vit_mini/8", img_size=32, batch_size=256, warmup_epochs=1, workers=1, seeds=3,
    methods=["simclr", "swav"],
    # an hour of training each on the 2-core CPU: SimCLR's 18 epochs were measured (60.5 min, docs/study.md: 202 s
    # an epoch); the others scaled by their epoch cost against SimCLR's on the study's idle seeds (seeds 1-2 of
    # docs/study_results.jsonl, s per 50,000 images: SimCLR 187, SwAV 204, BYOL 256, DINO 292, MoCo v3 352)
    hour_epochs={"simclr": 18, "swav": 16, "moco": 9, "byol": 13, "dino": 11},
    knn_every=3, monitor_val_fraction=0.1,     # the pretrainings' k-NN monitor: 10% of train held out as queries
    labels=[500, 5000],
    full_label_epochs=44, full_label_lr=1e-3,  # all 50,000 labels: the one-hour supervised run (docs/study.md)
    full_finetune_epochs=0,                    # the pretrained networks fine-tuned on all labels: off (an hour each)
    val_fraction=0.2,                          # of each class of the labelled images: the recipe search's queries
    lrs=[5e-4, 1e-3, 2e-3],                    # AdamW, per 256 images (eval_linear's --finetune-lr)
    augs=["default", "weak", "strong"],        # AUGS; the first is the default
    # per task: batch, the epoch grid (the middle one first in the search), and max_epochs: while the grid's longest
    # point wins, the search tries its double, up to max_epochs, the doublings that keep a run within the images
    # the hour's pretraining saw (image_budget, 18 x 50,000: 1,800 epochs of 500 images, 180 of 5,000, 450 of
    # 2,000; epoch_cap). Another count (--labels): the grid of the nearer count here, capped the same way.
    image_budget=900_000,
    # 500 labels: 50 / 100 / 200 first; 200 won at the edge, so the grid was widened by a doubling each side (the
    # middle, where the search starts, stays 100) before the doubling rule existed; 400 lost.
    search={"500": dict(batch_size=64, epochs=[25, 50, 100, 200, 400], max_epochs=1600),
            "5000": dict(batch_size=128, epochs=[10, 20, 40], max_epochs=160),
            "transfer": dict(batch_size=128, epochs=[15, 30, 60], max_epochs=240)},
)

AUGS_DEFAULT = "default"
AUGS = {  # the supervised recipe's augmentation strengths (ViewSpecs, both augmentation paths)
    "default": data.finetune_spec,                               # crop 20-100% of the area + flip (eval_linear's)
    "weak": lambda size: data.ViewSpec(size, scale=(0.5, 1.0)),  # crop 50-100% + flip
    "strong": lambda size: data.simclr_spec(size, 0.5),          # SimCLR's CIFAR views: crop 8-100%, colour, gray
}


def resolve(args):
    """FEW_LABEL with the command line's overrides; a one-line error for the study's flags that do not apply."""
    unused = [flag for flag, value in (("--no-unseen", args.no_unseen), ("--no-finetune", args.no_finetune),
                                       ("--subset-per-class", args.subset_per_class),
                                       ("--unseen-seeds", args.unseen_seeds), ("--finetune-lr", args.finetune_lr),
                                       ("--transfer-finetune-epochs", args.transfer_finetune_epochs))
              if value not in (None, False)]
    if unused:
        raise SystemExit(f"{', '.join(unused)}: not a setting of --protocol few-label (its own: --labels, "
                         f"--search-epochs, --search-lrs, --search-batch-size, --full-finetune-epochs)")
    cfg = json.loads(json.dumps(FEW_LABEL))
    cfg["arch"], cfg["patch_size"] = study.split_arch(args.archs or cfg["arch"])
    for k in ("img_size", "batch_size", "warmup_epochs", "workers", "seeds", "knn_every"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.arch or args.patch_size:
        cfg["arch"], cfg["patch_size"] = args.arch or cfg["arch"], args.patch_size or cfg["patch_size"]
    if cfg["img_size"] % cfg["patch_size"]:
        raise SystemExit(f"--img-size {cfg['img_size']} is not a multiple of the patch size {cfg['patch_size']}")
    cfg["methods"] = args.methods or cfg["methods"]
    if args.epochs is not None:
        cfg["hour_epochs"] = {m: args.epochs for m in cfg["methods"]}
    if args.supervised_epochs is not None:
        cfg["full_label_epochs"] = args.supervised_epochs
    if args.labels:
        cfg["labels"] = args.labels
        cfg["search"] = {**{str(n): cfg["search"].get(str(n)) or other_count(cfg, n) for n in args.labels},
                         "transfer": cfg["search"]["transfer"]}
    if args.search_epochs:
        for task in cfg["search"].values():
            task["epochs"], task["max_epochs"] = args.search_epochs, max(args.search_epochs)  # the grid as given
    if args.search_batch_size:
        for task in cfg["search"].values():
            task["batch_size"] = args.search_batch_size
    cfg["lrs"] = args.search_lrs or cfg["lrs"]
    if args.full_finetune_epochs is not None:
        cfg["full_finetune_epochs"] = args.full_finetune_epochs
    if args.monitor_val_fraction is not None:
        cfg["monitor_val_fraction"] = args.monitor_val_fraction
    cfg["transfer"] = not args.no_transfer
    return cfg


def epoch_cap(longest, n, budget):
    """The longest doubling of `longest` epochs whose run on n images stays within `budget` images (at least
    `longest`): how far the recipe search may double its grid."""
    cap = longest
    while 2 * cap * n <= budget:
        cap *= 2
    return cap


def other_count(cfg, n):
    """The recipe search's grid for n labels where FEW_LABEL has none: the batch and epochs of the count it lists
    nearest on a log scale (500 or 5,000), max_epochs capped by the pretraining's images (epoch_cap)."""
    near = min((k for k in cfg["search"] if k.isdigit()), key=lambda k: abs(math.log(n / int(k))))
    grid = cfg["search"][near]
    return {**grid, "max_epochs": epoch_cap(max(grid["epochs"]), n, cfg["image_budget"])}


# ---- the labelled images ----

def label_draw(labels, n, seed):
    """The indices (into the train split) of seed `seed`'s n labelled images: n / len(labels) of every class,
    stratified_split's held-out part, as `eval_linear.py --label-fraction F --label-seed seed` draws them."""
    return eval_linear.stratified_split(labels, n / len(labels), seed)[1]


def search_split(labels, labelled, fraction, seed=0):
    """(training, validation) indices into the train split: `fraction` of every class of the labelled images
    held out for the recipe search, as eval_linear's --val-fraction carves them (after --label-fraction)."""
    labelled = torch.as_tensor(labelled)
    train, val = eval_linear.stratified_split([labels[i] for i in labelled.tolist()], fraction, seed)
    return labelled[train], labelled[val]


# ---- the plan ----

def make_plan(args, cfg):
    """The few-label study's settings, data and every network it pretrains, as plain dicts (study.json)."""
    out = os.path.abspath(args.out or "runs/few_label")
    if args.dataset == "folder":
        src = os.path.abspath(args.data_dir)
        if not os.path.isdir(os.path.join(src, "train")):
            raise SystemExit(f"--data-dir {args.data_dir}: expected an ImageFolder tree with train/<class>/ and test/")
    else:
        src = study.export_folder(args.dataset, args.data_dir, os.path.join(out, "data", args.dataset), args.download,
                                  args.dry_run)
    transfer = None
    if cfg["transfer"]:
        if args.transfer_dataset != "folder" or not os.path.isdir(args.transfer_data_dir):
            raise SystemExit(f"--transfer-data-dir {args.transfer_data_dir}: the few-label protocol fine-tunes on an "
                             f"ImageFolder tree (tinyimagenet20: benchmarks/tinyimagenet20.py builds it), or "
                             f"--no-transfer")
        transfer = os.path.abspath(args.transfer_data_dir)
    pretrainings = []
    for m in cfg["methods"]:
        mcfg = {**cfg, "epochs": cfg["hour_epochs"][m]}
        run_dir = os.path.join(out, "runs", f"{m}_hour")
        cmd = [sys.executable, f"{m}.py", "--dataset", "folder", "--data-dir", study.shown(src),
               "--arch", cfg["arch"], "--patch-size", str(cfg["patch_size"]), "--img-size", str(cfg["img_size"]),
               "--epochs", str(mcfg["epochs"]), "--batch-size", str(cfg["batch_size"]),
               "--warmup-epochs", str(cfg["warmup_epochs"]), "--workers", str(cfg["workers"]),
               "--knn-every", str(cfg["knn_every"]), "--val-fraction", f"{cfg['monitor_val_fraction']:g}",
               "--seed", "0", *(["--device", args.device] if args.device else []), *study.method_flags(m, mcfg),
               "--out", study.shown(run_dir)]
        pretrainings.append(dict(name=f"{m}_hour", model=m, seed=0, part="main", cmd=cmd, data_dir=src,
                                 num_images=None, run_dir=run_dir, ckpt=os.path.join(run_dir, "checkpoint.pt"),
                                 epochs=mcfg["epochs"]))
    return dict(protocol="few-label", cfg=cfg, out=out, data_dir=src, transfer_dir=transfer, methods=cfg["methods"],
                pretrainings=pretrainings, device=args.device)


class Study:
    """The state of one few-label study: its plan, its results rows (kept as they come), the data."""

    def __init__(self, plan, device, dry_run):
        self.plan, self.cfg, self.device, self.dry_run = plan, plan["cfg"], device, dry_run
        self.results = os.path.join(plan["out"], "results.jsonl")
        self.rows = study.read_rows(self.results)
        self.sets = {}
        self.recipes = {("supervised", "cifar10"): None}  # (trainer, task): the searched recipe

    def root(self, task):
        return self.plan["transfer_dir"] if task == "transfer" else self.plan["data_dir"]

    def fraction(self, task, n):
        """n labels as eval_linear's --label-fraction of the task's train split (a placeholder in a dry run
        before the data exists)."""
        if not os.path.isdir(os.path.join(self.root(task), "train")):
            return f"<{n} / train images>"
        return f"{n / len(self.dataset(task, 'train')[1]):g}"

    def dataset(self, task, split):
        """(train or test split, its labels) of CIFAR-10 or the transfer set, built once."""
        root = self.root(task)
        if (root, split) not in self.sets:
            ds = data.build_dataset("folder", root, split)
            self.sets[root, split] = (ds, data.labels(ds).tolist())
        return self.sets[root, split]

    def found(self, key, command, ckpt=None):
        """The results row of `key` made by `command` (from the checkpoint as it is now), or None."""
        mtime = os.stat(ckpt).st_mtime_ns if ckpt and os.path.exists(ckpt) else None
        return next((r for r in reversed(self.rows) if r["key"] == key and r["command"] == command
                     and r.get("ckpt_mtime") == mtime), None)

    def keep(self, row):
        os.makedirs(self.plan["out"], exist_ok=True)
        row.update(cpu=study.cpu_model(), cores=study.cores(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        return row

    # -- what a run is: its trainer, data and recipe --

    def backbone(self, trainer, seed):
        """(a fresh backbone, its normalization, its checkpoint or None): the pretrained network of `trainer`, or
        the untrained ViT of `seed` for supervised (built as `eval_linear.py --random-init --seed` builds it)."""
        cfg = self.cfg
        if trainer == "supervised":
            torch.manual_seed(seed)
            return (vit.ARCHS[cfg["arch"]](img_size=cfg["img_size"], patch_size=cfg["patch_size"]),
                    data.MEAN_STD["folder"], None)
        ckpt = self.pretraining(trainer)["ckpt"]
        backbone, meta = eval_linear.load_backbone(ckpt)
        return backbone, tuple(map(tuple, meta["mean_std"] or data.MEAN_STD["folder"])), ckpt

    def pretraining(self, method):
        return next(p for p in self.plan["pretrainings"] if p["model"] == method)

    def command(self, trainer, task, seed, recipe, n=None, val=False):
        """The eval_linear command that trains and scores the same network (the default augmentation only)."""
        cfg = self.cfg
        root = self.root(task)
        who = (["--random-init", "--arch", cfg["arch"], "--patch-size", str(cfg["patch_size"]),
                "--img-size", str(cfg["img_size"])] if trainer == "supervised"
               else ["--ckpt", study.shown(self.pretraining(trainer)["ckpt"])])
        labels = [] if n is None else ["--label-fraction", self.fraction(task, n), "--label-seed", str(seed)]
        cmd = ["python", "eval_linear.py", *who, "--dataset", "folder", "--data-dir", study.shown(root), *labels,
               *(["--val-fraction", f"{cfg['val_fraction']:g}"] if val else []), "--no-probe", "--finetune",
               "--finetune-epochs", str(recipe["epochs"]), "--finetune-lr", f"{recipe['lr']:g}",
               "--batch-size", str(recipe["batch_size"]), "--workers", str(cfg["workers"]), "--seed", str(seed)]
        text = shlex.join(cmd)
        return text if recipe["aug"] == "default" else f"{text}  # with --aug-spec {recipe['aug']}: few_label.AUGS"

    def run(self, stage, trainer, task, seed, recipe, n=None, monitor=False):
        """One network trained and scored: stage 'search' on seed 0's validation split of the labelled images
        (or of the transfer set's train images), 'final' on all of seed `seed`'s labelled images against the test
        split. monitor: also the k-NN monitor of the training scripts on the trained backbone (the curve)."""
        key = f"{stage}:{trainer}:{task}:s{seed}:lr{recipe['lr']:g}:{recipe['aug']}:ep{recipe['epochs']}"
        command = self.command(trainer, task, seed, recipe, n, val=stage == "search")
        ckpt = None if trainer == "supervised" else self.pretraining(trainer)["ckpt"]
        row = self.found(key, command, ckpt)
        if row is not None:
            return row
        print(f"[few-label] {key}: {command}", flush=True)
        if self.dry_run:
            return None
        train_set, labels = self.dataset(task, "train")
        labelled = torch.arange(len(labels)) if n is None else label_draw(labels, n, seed)
        if stage == "search":
            fit, held = search_split(labels, labelled, self.cfg["val_fraction"], seed)
            evaluation = Subset(train_set, held.tolist())
        else:
            fit, evaluation = labelled, self.dataset(task, "test")[0]
        aug_set = Subset(data.build_dataset("folder", self.root(task), "train"), fit.tolist())  # its own transform
        backbone, mean_std, _ = self.backbone(trainer, seed)
        out = study.train_eval(backbone, aug_set, evaluation, AUGS[recipe["aug"]], mean_std, recipe["epochs"],
                         recipe["lr"], recipe["batch_size"], self.cfg["workers"], seed, self.device)
        row = dict(key=key, stage=stage, trainer=trainer, task=task, seed=seed, labels=n, **recipe,
                   num_train=len(fit), num_eval=len(evaluation), top1=out["top1"], seconds=round(out["seconds"], 1),
                   cpu_seconds=round(out["cpu_seconds"], 1), images_per_epoch=out["images_per_epoch"],
                   command=command, ckpt=ckpt, ckpt_mtime=ckpt and os.stat(ckpt).st_mtime_ns,
                   device=str(self.device))
        if monitor:
            row["monitor_knn"] = self.monitor_knn(out["net"][0], fit)
        print(f"[few-label] {key}: top-1 {out['top1']:.2f} on {'validation' if stage == 'search' else 'test'} "
              f"[{out['seconds']:.0f} s]", flush=True)
        return self.keep(row)

    def monitor_knn(self, backbone, trained_on):
        """The training scripts' k-NN monitor on `backbone`: the memory bank the train split less the held-out
        monitor_val_fraction of every class, the held-out images the queries (eval_linear.knn_monitor_loaders),
        less the images `backbone` was trained on with their labels (`trained_on`, train-split indices): seed 0's
        label draw comes from the same per-class shuffle as those queries, so all its images are among them."""
        cfg = self.cfg
        bank, queries = eval_linear.knn_monitor_loaders("folder", self.plan["data_dir"], cfg["img_size"],
                                                        *data.MEAN_STD["folder"], cfg["workers"],
                                                        cfg["monitor_val_fraction"], exclude=trained_on.tolist())
        return eval_linear.knn_eval(backbone, bank, queries, self.device)

    # -- the recipe search, the final runs, the frozen-feature evaluations --

    def search(self, trainer, task, n=None):
        """The recipe of `trainer` for `task` (module docstring: three stages on seed 0's validation split), or
        None in a dry run where a stage needs the one before. Returns dict(lr, aug, epochs, batch_size, val_top1)."""
        grid = self.cfg["search"][task]
        epochs = grid["epochs"]
        mid = epochs[len(epochs) // 2]
        monitor = trainer == "supervised" and task == str(min(self.cfg["labels"]))  # the learning curve's points
        base = dict(aug=AUGS_DEFAULT, epochs=mid, batch_size=grid["batch_size"])

        def best(points):
            rows = [(self.run("search", trainer, task, 0, p, n, monitor), p) for p in points]
            if any(r is None for r, _ in rows):
                return None
            return max(rows, key=lambda rp: rp[0]["top1"])  # max keeps the first of equal scores

        chosen = best([{**base, "lr": lr} for lr in self.cfg["lrs"]])
        if chosen is None:
            print(f"[few-label] search:{trainer}:{task}: then {'the other augmentations, then ' if trainer == 'supervised' else ''}"
                  f"epochs {', '.join(str(e) for e in epochs if e != mid)} at the best lr (doubled while the longest "
                  f"wins, up to {grid['max_epochs']})", flush=True)
            return None
        if trainer == "supervised":
            chosen = best([chosen[1], *({**chosen[1], "aug": a} for a in self.cfg["augs"] if a != AUGS_DEFAULT)])
        if chosen is not None:
            chosen = best([chosen[1], *({**chosen[1], "epochs": e} for e in epochs if e != mid)])
        longest = max(epochs)
        while chosen is not None and chosen[1]["epochs"] == longest and 2 * longest <= grid["max_epochs"]:
            longest *= 2  # (4) the longest won: its double, against it (a tie keeps the shorter)
            chosen = best([chosen[1], {**chosen[1], "epochs": longest}])
        if chosen is None:  # a dry run of a study part-way through the search: a later stage lacks rows
            print(f"[few-label] search:{trainer}:{task}: its later stages wait on the rows above", flush=True)
            return None
        return {**chosen[1], "val_top1": chosen[0]["top1"]}

    def features(self, method, task):
        """(train features, labels, test features, labels) of a pretrained network on CIFAR-10 or the transfer set
        (eval_linear's extraction at the pretraining resolution and normalization), extracted once per invocation."""
        key = ("features", method, self.root(task))  # the label counts share CIFAR-10's features
        if key not in self.sets:
            backbone, mean_std, _ = self.backbone(method, 0)
            backbone.to(self.device)
            feats = []
            for split in ("train", "test"):
                loader = data.build_eval_loader(self.dataset(task, split)[0], self.cfg["img_size"], *mean_std,
                                                256, self.cfg["workers"])
                feats += eval_linear.extract_features(backbone, loader, self.device)
            backbone.cpu()
            self.sets[key] = feats
        return self.sets[key]

    def frozen(self, method, task, n, seed):
        """k-NN and the linear probe of a pretrained network's frozen features on seed `seed`'s n labelled images
        of the task (n None: every train image), top-1 on its test split: eval_linear's functions and seeds, as its
        CLI with --label-fraction."""
        ckpt = self.pretraining(method)["ckpt"]
        key = f"frozen:{method}:{task}:s{seed}"
        frac = [] if n is None else ["--label-fraction", self.fraction(task, n), "--label-seed", str(seed)]
        command = shlex.join(["python", "eval_linear.py", "--ckpt", study.shown(ckpt), "--dataset", "folder",
                              "--data-dir", study.shown(self.root(task)), *frac, "--seed", str(seed)])
        row = self.found(key, command, ckpt)
        if row is not None or self.dry_run:
            if row is None:
                print(f"[few-label] {key}: {command}")
            return row
        xtr, ytr, xte, yte = self.features(method, task)
        idx = (torch.arange(len(ytr)) if n is None else label_draw(ytr.cpu(), n, seed)).to(xtr.device)
        t0, c0 = time.time(), study.cpu_seconds()
        classes = data.num_classes(self.dataset(task, "train")[0])
        knn = eval_linear.knn_accuracy(xtr[idx], ytr[idx], xte, yte, classes)[0]
        probe = eval_linear.linear_probe(xtr[idx], ytr[idx], xte, yte, classes, seed=seed)["top1"]
        return self.keep(dict(key=key, stage="frozen", trainer=method, task=task, seed=seed, labels=n,
                              num_train=len(idx), knn_top1=knn, linear_top1=probe, seconds=round(time.time() - t0, 1),
                              cpu_seconds=round(study.cpu_seconds() - c0, 1), command=command, ckpt=ckpt,
                              ckpt_mtime=os.stat(ckpt).st_mtime_ns, device=str(self.device)))


def run(args, argv, device):
    """The whole few-label study: pretrain, search, train, evaluate, tabulate. Returns the table (None in a dry
    run)."""
    cfg = resolve(args)
    plan = make_plan(args, cfg)
    s = Study(plan, device, args.dry_run)
    print(f"[few-label] {json.dumps(cfg)} -> {study.shown(plan['out'])}")
    if os.path.isdir(os.path.join(plan["data_dir"], "train")):
        total = len(s.dataset("cifar10", "train")[1])
        if any(not 0 < n < total for n in cfg["labels"]):
            raise SystemExit(f"--labels {','.join(map(str, cfg['labels']))}: each between 0 and the {total:,} train "
                             f"images")
    if not args.dry_run:
        os.makedirs(plan["out"], exist_ok=True)
        with open(os.path.join(plan["out"], "study.json"), "w") as f:
            json.dump({**plan, "argv": argv, "command": study.study_command(argv)}, f, indent=1)
    # ---- pretraining: an hour each, on all images without labels ----
    for model in plan["pretrainings"]:
        trained = study.pretrain(model, {**cfg, "epochs": model["epochs"]}, args.dry_run)
        have = s.found(f"pretrain:{model['model']}", study.command_line(model["cmd"]), model["ckpt"])
        if not args.dry_run and (trained or have is None):
            row = study.pretrain_row({"cfg": {**cfg, "epochs": model["epochs"]}, "device": args.device}, model)
            s.keep({**row, "key": f"pretrain:{model['model']}", "command": study.command_line(model["cmd"])})
    # ---- all 50,000 labels: the reference line ----
    full = dict(lr=cfg["full_label_lr"], aug=AUGS_DEFAULT, epochs=cfg["full_label_epochs"], batch_size=cfg["batch_size"])
    s.run("final", "supervised", "cifar10", 0, full)
    for m in cfg["methods"]:
        s.frozen(m, "cifar10", None, 0)
        if cfg["full_finetune_epochs"]:
            s.run("final", m, "cifar10", 0, {**full, "epochs": cfg["full_finetune_epochs"]})
    # ---- few labels: the recipes on seed 0's validation split, then every seed ----
    tasks = [(str(n), n) for n in cfg["labels"]] + ([("transfer", None)] if cfg["transfer"] else [])
    for task, n in tasks:
        for trainer in ["supervised", *cfg["methods"]]:
            recipe = s.recipes[trainer, task] = s.search(trainer, task, n)
            if recipe and s.found(f"recipe:{trainer}:{task}", json.dumps(recipe)) is None:  # for the figure
                s.keep(dict(key=f"recipe:{trainer}:{task}", stage="recipe", trainer=trainer, task=task, **recipe,
                            command=json.dumps(recipe)))
            for seed in range(cfg["seeds"]):
                if trainer != "supervised":
                    s.frozen(trainer, task, n, seed)
                if recipe is None:
                    print(f"[few-label] final:{trainer}:{task}:s{seed}: the searched recipe, all labelled images, "
                          f"top-1 on test")
                    continue
                s.run("final", trainer, task, seed, {k: recipe[k] for k in ("lr", "aug", "epochs", "batch_size")},
                      n)
    if args.dry_run:
        return None
    table = write_table(s, argv)
    print("\n" + table)
    if not args.no_figures:
        import plots  # benchmarks/plots.py; matplotlib only there, and only if installed
        try:
            plots.make_few_label_figures(plan["out"], docs=args.docs)
        except plots.NoMatplotlib as e:
            print(f"[few-label] figure skipped: {e}")
    return table


# ---- the table ----

def cell(values, hours=None):
    """'61.2 ± 0.4 · 2.1 h': mean ± sample std of the seeds' top-1, and CPU hours where given."""
    text = study.mean_std(values)
    return text + (f" · {hours:.2f} h" if hours is not None and values else "")


def write_table(s, argv):
    """table.md: the few-label table (top-1 and CPU hours per cell), its protocol lines, the recipes the search
    chose, the paired tests per label count, how close 10% labels get to the all-label line, the command."""
    cfg, rows = s.cfg, s.rows
    methods = cfg["methods"]
    by_key = {r["key"]: r for r in rows}  # the last row of each key

    def final(trainer, task, seed):
        recipe = s.recipes.get((trainer, task))
        if task == "cifar10":
            recipe = dict(lr=cfg["full_label_lr"], aug=AUGS_DEFAULT, batch_size=cfg["batch_size"],
                          epochs=cfg["full_label_epochs"] if trainer == "supervised" else cfg["full_finetune_epochs"])
        if recipe is None or not recipe["epochs"]:
            return None
        return by_key.get(f"final:{trainer}:{task}:s{seed}:lr{recipe['lr']:g}:{recipe['aug']}:ep{recipe['epochs']}")

    def hours(seconds):
        return None if seconds is None else seconds / 3600

    def named(col):  # a column's key as the table names it: "simclr + probe" -> "SimCLR + probe"
        m, _, how = col.partition(" + ")
        return study.LABELS.get(m, m) + (f" + {how}" if how else "")

    pre = {m: by_key.get(f"pretrain:{m}") for m in methods}
    # a pretraining resumed after an interruption recorded the resumed part's CPU time only: no cost, not a low one
    resumed = [m for m in methods if pre[m] and pre[m].get("resumed")]
    pre_cpu = {m: pre[m].get("cpu_seconds") if pre[m] and m not in resumed else None for m in methods}
    total = len(s.dataset("cifar10", "train")[1])
    tasks = [(str(n), n, f"{n:,} ({n / total:.0%})") for n in cfg["labels"]] + [("cifar10", None, f"{total:,} (all)")]
    if cfg["transfer"]:
        ds = s.dataset("transfer", "train")[0]
        tasks += [("transfer", None, f"transfer: {os.path.basename(s.plan['transfer_dir'])}, all {len(ds):,} "
                                     f"({len(ds) // data.num_classes(ds)} a class)")]
    header = ["labels", "supervised from scratch"]
    for m in methods:
        header += [f"{study.LABELS[m]} + k-NN", f"{study.LABELS[m]} + probe", f"{study.LABELS[m]} + fine-tune"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    seeds_of = {}  # (task, column) -> {seed: top-1}: the paired tests
    for task, n, label in tasks:
        seeds = range(cfg["seeds"]) if task != "cifar10" else [0]
        sup = {sd: r for sd in seeds if (r := final("supervised", task, sd))}
        cells = [cell([r["top1"] for r in sup.values()],
                      hours(sum(r["cpu_seconds"] for r in sup.values()) / len(sup)) if sup else None)]
        seeds_of[task, "supervised"] = {sd: r["top1"] for sd, r in sup.items()}
        for m in methods:
            frozen = {sd: r for sd in seeds if (r := by_key.get(f"frozen:{m}:{task}:s{sd}"))}
            tuned = {sd: r for sd in seeds if (r := final(m, task, sd))}
            base = hours(pre_cpu[m])
            cells.append(cell([r["knn_top1"] for r in frozen.values()], base))
            cells.append(cell([r["linear_top1"] for r in frozen.values()], base))
            tune_h = (base + hours(sum(r["cpu_seconds"] for r in tuned.values()) / len(tuned))
                      if tuned and base is not None else None)
            cells.append(cell([r["top1"] for r in tuned.values()], tune_h) if tuned or task != "cifar10"
                         else "not run")
            seeds_of[task, f"{m} + k-NN"] = {sd: r["knn_top1"] for sd, r in frozen.items()}
            seeds_of[task, f"{m} + probe"] = {sd: r["linear_top1"] for sd, r in frozen.items()}
            seeds_of[task, f"{m} + fine-tune"] = {sd: r["top1"] for sd, r in tuned.items()}
        lines.append("| " + " | ".join([label, *cells]) + " |")

    recipes = [f"{study.LABELS.get(t, t)} on {task}: lr {r['lr']:g} per 256, {r['aug']} augmentation, "
               f"{r['epochs']} epochs, batch {r['batch_size']} (validation top-1 {r['val_top1']:.1f})"
               for (t, task), r in s.recipes.items() if r]
    search_cpu = sum(r["cpu_seconds"] for r in rows if r.get("stage") == "search")
    lines += [
        "",
        f"- **Labels**: {', '.join(f'{n:,}' for n in cfg['labels'])} of CIFAR-10's train labels, stratified, drawn "
        f"per seed (`eval_linear.py --label-fraction F --label-seed s`); mean ± sample std over {cfg['seeds']} seeds "
        f"(the label draw and the training seed); the all-label and pretraining runs: seed 0. Top-1 (%) on the "
        f"{len(s.dataset('cifar10', 'test')[1]):,} test images"
        + (f"; the transfer row on {os.path.basename(s.plan['transfer_dir'])}'s "
           f"{len(s.dataset('transfer', 'test')[1]):,} test images at {cfg['img_size']} px." if cfg["transfer"]
           else "."),
        f"- **Supervised from scratch**: {cfg['arch']}/{cfg['patch_size']} from random init trained on the labelled "
        f"images only (`eval_linear.py --random-init ... --finetune`), its recipe searched on seed 0's labelled "
        f"images ({cfg['val_fraction']:.0%} of each class held out). All {total:,} labels: {cfg['full_label_epochs']} "
        f"epochs at lr {cfg['full_label_lr']:g} per 256, the study's recipe for the hour (not searched again).",
        f"- **Self-supervised**: "
        + "; ".join(f"{study.LABELS[m]} {s.pretraining(m)['epochs']} epochs on all {total:,} images without "
                    f"labels" for m in methods)
        + " (batch %d; each method's script and defaults; pretrained once, seed 0, shared by every label count and "
          "seed). k-NN (k=20) and the linear probe on the frozen features of the labelled images; fine-tune: the "
          "network and a new head trained end to end on them with the recipe the search chose for it "
          "(crop + flip)." % cfg["batch_size"],
        "- **Recipes** (the search: the lr grid at the middle epochs, the augmentations for supervised, then the "
        f"epochs, doubled while the longest wins; seed 0's validation split): " + ("; ".join(recipes) or "none yet") + ".",
        "- **Cost** (after each number): CPU hours (user + system time of all its processes; 2 cores give about 2 "
        "CPU hours an hour): supervised, its own training; k-NN and probe, the pretraining's (the probe itself "
        "takes seconds); fine-tune, the pretraining's plus the fine-tune's. The pretraining is paid once for every "
        f"label count and seed. The recipe search cost {search_cpu / 3600:.2f} CPU hours in all, not in the cells."
        + "".join(f" {study.LABELS[m]}'s pretraining was resumed after an interruption and recorded the resumed "
                  f"part's CPU time only: its cells have no cost." for m in resumed),
    ]
    tests = []
    for task, n, label in tasks:
        sup = seeds_of[task, "supervised"]
        family = [(col, study.paired(seeds_of[task, col], sup)) for (t, col) in seeds_of
                  if t == task and col != "supervised" and seeds_of[task, col]]
        family = [(col, p) for col, p in family if p[3] is not None]
        if not family:
            continue
        adjusted = study.holm([p[3] for _, p in family])
        claims = []
        for (col, (d, _, t, p)), q in zip(family, adjusted):
            verdict = ("above" if d > 0 else "below") if q < study.ALPHA else "not shown to differ from"
            claims.append(f"{named(col)} {verdict} supervised ({d:+.1f}, t = {t:.1f}, Holm p = {q:.3f})")
        tests.append(f"- {label}: " + "; ".join(claims) + ".")
    if tests:
        lines += ["", f"Against supervised from scratch, per label count: paired t-tests over the seeds (seed s of "
                      f"every cell shares its label draw), Holm's correction within the label count:", *tests]
    top = seeds_of.get(("cifar10", "supervised"))
    if top and cfg["labels"]:
        n = max(cfg["labels"])
        best = {col: sum(v.values()) / len(v) for (t, col), v in seeds_of.items() if t == str(n) and v}
        if best:
            col = max(best, key=best.get)
            lines += ["", f"Towards the all-label line: with {n:,} labels the best cell ({named(col)}) reaches "
                          f"{best[col]:.1f}, against {top[0]:.1f} for supervised on all {total:,} labels "
                          f"({best[col] - top[0]:+.1f} points)."]
    lines += ["", f"Command: `{study.study_command(argv)}`",
              "Hardware, as each run recorded it: " + "; ".join(sorted({f"{r['cpu']}, {r['cores']} cores"
                                                                        for r in rows if r.get("cpu")}))
              + "."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(s.plan["out"], "table.md"), "w") as f:
        f.write(text)
    return text

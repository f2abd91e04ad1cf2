"""What a self-supervised pretraining is worth: k-NN, linear probe and fine-tuning of a frozen/unfrozen ViT.

Protocols (all train on the dataset's train split and report top-1 / top-5 in percent on its test split):
  - weighted k-NN (Wu et al. 2018, InstDisc, https://arxiv.org/abs/1805.01978, §3.4; the version of DINO's
    eval_knn.py): L2-normalized CLS features, cosine similarity to every train feature, the k most similar
    vote for their class with weight exp(sim / T). No training, no hyperparameter search: k=20, T=0.07.
  - linear probe (Zhang et al. 2016; the standard SSL protocol of MoCo, SimCLR, BYOL): a linear classifier on
    the frozen CLS features. Features are extracted once and cached (no augmentation), standardized with the
    train mean/std, and the classifier is trained for 100 epochs with SGD and a cosine schedule: seconds.
  - fine-tuning (`--finetune`, as MoCo v3 and MAE): the whole network and a linear head trained end to
    end with AdamW, cosine schedule and random-resized-crop + flip augmentation.
Pretraining effect: evaluate on the pretraining data (the default). Transfer: `--dataset` another one.
The untrained same-architecture network (`--random-init`) is the baseline every number should beat: a random
vit_mini/8 reaches 30.5% k-NN and 37.6% linear top-1 on CIFAR-10 (the last command below, 80 s on 2 CPU cores).

    python eval_linear.py --ckpt runs/byol/checkpoint.pt runs/moco/checkpoint.pt --random-init
    python eval_linear.py --ckpt runs/byol/checkpoint.pt --dataset cifar100 --data-dir data
    python eval_linear.py --random-init --arch vit_mini --patch-size 8 --dataset folder --data-dir ~/cifar10

`--ckpt` takes this repo's checkpoints (any method) and plain timm / DeiT ViT state dicts. Prints one markdown
table; `--results results.jsonl` appends one JSON line per evaluated model.
"""

import argparse
import copy
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

import data
import vit


# ---- features ----

@torch.no_grad()
def extract_features(model, loader, device):
    """CLS features of every image in `loader`: ((N, D) float32, (N,) long), both on `device`.

    Eval mode (the caller's mode is restored), no grad, bf16 autocast on CUDA, features returned in fp32.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, targets in tqdm(loader, desc="features", leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = model(images.to(device, non_blocking=True))              # (B, D)
        feats.append(f.float())
        labels.append(torch.as_tensor(targets).to(device))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def accuracy(scores, labels):
    """(top-1, top-5) in percent of class scores (M, C) against labels (M,); top-5 is top-C when C < 5.
    A class scored -inf (k-NN: no neighbour voted for it) is never counted, not even among the top 5."""
    top_scores, top5 = scores.topk(min(5, scores.shape[1]), dim=1)               # (M, 5) each
    correct = (top5 == labels[:, None]) & (top_scores > float("-inf"))            # (M, 5)
    n = max(1, labels.shape[0])
    return 100.0 * correct[:, 0].sum().item() / n, 100.0 * correct.any(1).sum().item() / n


# ---- weighted k-NN ----

@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, num_classes, k=20, temperature=0.07, chunk_size=256):
    """Class scores (M, C) of the weighted cosine k-NN (InstDisc §3.4, DINO eval_knn.py).

    For each test feature: cosine similarity s_i to all N train features, keep the k largest, and add
    exp(s_i / T) to the score of neighbour i's class. Predicted class = argmax of the scores. A class that no
    neighbour voted for scores -inf, so it is never ranked (not in the top 5 either, whatever its index:
    DINO's eval_knn leaves it at 0 and lets topk break the tie by label index). Test rows are processed
    `chunk_size` at a time, so memory is chunk_size x N (10k x 50k on CIFAR would be 2 GB at once).
    """
    train = F.normalize(train_feats.float(), dim=1)                              # (N, D)
    test = F.normalize(test_feats.float(), dim=1)                                # (M, D)
    train_labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    scores = torch.zeros(test.shape[0], num_classes, device=train.device)       # (M, C)
    votes = torch.zeros(test.shape[0], num_classes, device=train.device)        # (M, C) neighbours per class
    for i in range(0, test.shape[0], chunk_size):
        sim = test[i:i + chunk_size] @ train.T                                    # (b, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)                                     # (b, k) nearest neighbours
        weights = (top_sim / temperature).exp()                                   # (b, k) exp(s / T) <= e^(1/T)
        scores[i:i + chunk_size].scatter_add_(1, train_labels[top_idx], weights)  # sum of weights per class
        votes[i:i + chunk_size].scatter_add_(1, train_labels[top_idx], torch.ones_like(weights))
    return scores.masked_fill(votes == 0, float("-inf"))


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=20, temperature=0.07):
    """(top-1, top-5) in percent of the weighted k-NN classifier."""
    scores = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return accuracy(scores, test_labels.to(scores.device))


def gather_features(feats, labels):
    """Under torch.distributed: every process's (feats, labels) shard, concatenated, on every process (shards
    may differ in length by one; they are padded for all_gather, which needs equal shapes). Else a no-op."""
    if not (dist.is_available() and dist.is_initialized()):
        return feats, labels
    n = torch.tensor([len(labels)], device=feats.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(sizes))
    out = []
    for t in (feats, labels.to(feats.device)):
        padded = torch.cat([t, t.new_zeros(longest - len(t), *t.shape[1:])])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]))
    return out[0], out[1]


def knn_eval(backbone, train_loader, test_loader, device, k=20, temperature=0.07):
    """k-NN top-1 (percent) of `backbone`'s CLS features: what the training scripts log every --knn-every epochs.

    The loaders should be un-augmented and unshuffled (data.build_eval_loader); extract_features restores the
    backbone's train/eval mode. Under torch.distributed every process must call it: each extracts the
    features of its data.Shard of the images, the shards are gathered, and every process returns the same
    accuracy (no process idles in a collective while another extracts 60,000 images alone).
    """
    train_feats, train_labels = gather_features(*extract_features(backbone, train_loader, device))
    test_feats, test_labels = gather_features(*extract_features(backbone, test_loader, device))
    check_labels(train_labels, test_labels, "the k-NN monitor (--knn-every 0 turns it off)")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k, temperature)[0]


def knn_monitor_loaders(dataset, data_dir, img_size, mean, std, workers, val_fraction=0.0, exclude=()):
    """(memory bank, queries): the un-augmented loaders of the training scripts' k-NN monitor (knn_eval).

    val_fraction 0: the train split's labelled images against the test split, the number a run reports.
    val_fraction F in (0, 1): F of every class of the train split held out of the memory bank as the queries
    (stratified_split, seed 0: the same split whatever the run's --seed), a validation score that choices and
    sweeps read instead of the test split. Pretraining still sees the held-out images, without their labels.
    exclude: train-split indices left out of those queries, for a network trained on some of them with their
    labels (seed 0's label draw, eval_linear.py --label-fraction F --label-seed 0, comes from the same per-class
    shuffle: its images are the first of the queries).
    """
    train_set = data.build_dataset(dataset, data_dir, "train")
    if val_fraction:
        bank_idx, val_idx = stratified_split(data.labels(train_set), val_fraction)
        seen = set(int(i) for i in exclude)
        val_idx = [i for i in val_idx.tolist() if i not in seen]
        bank_set, query_set = Subset(train_set, bank_idx), Subset(train_set, val_idx)
    else:
        bank_set, query_set = train_set, data.build_dataset(dataset, data_dir, "test")
    return tuple(data.build_eval_loader(s, img_size, mean, std, 256, workers) for s in (bank_set, query_set))


def check_labels(train_labels, test_labels, what):
    """A one-line SystemExit, naming `what` is being evaluated, where the labels make any accuracy meaningless
    instead of a number that looks like a result: no test images, fewer than 2 classes in the train split (every
    prediction is right: 100%), or a test class that the train split lacks (its images can never be right)."""
    train_classes, test_classes = set(train_labels.unique().tolist()), set(test_labels.unique().tolist())
    if len(test_labels) == 0:
        raise SystemExit(f"{what}: no test images to score")
    if len(train_classes) < 2:
        raise SystemExit(f"{what}: the train split has {len(train_classes)} class, so every prediction is that class "
                         f"and any accuracy is 100%: use data with 2 or more classes")
    if test_classes - train_classes:
        raise SystemExit(f"{what}: the test split has label(s) {sorted(test_classes - train_classes)} that the train "
                         f"split lacks: no classifier trained on it can get their images right")


def _knn_lines(log_path):
    """The lines of a run's log.jsonl that hold a k-NN measurement."""
    with open(log_path) as f:
        return [line for line in map(json.loads, f) if line.get("knn_top1") is not None]


def last_knn(log_path):
    """{"knn_top1": the last k-NN measured in a run's log.jsonl, "knn_epoch": its epoch}: what a training script
    shows on each epoch's line on screen, where the log itself has null (not measured that epoch)."""
    measured = _knn_lines(log_path)
    return {"knn_top1": measured[-1]["knn_top1"], "knn_epoch": measured[-1]["epoch"]} if measured else {}


def duration(seconds):
    """'42 s', '3 min 40 s', '2 h 5 min'."""
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


def run_summary(log_path, ckpt_path, seconds, resumed_at=0, epochs=None):
    """A training script's last line: what the run gained by the k-NN of its log (epoch 0, the untrained network,
    to the last measurement), how long it took (`seconds`: this process, since a resume at epoch `resumed_at`; with
    resumed_at >= epochs nothing was trained), where the checkpoint is and what to run next."""
    measured = _knn_lines(log_path)
    if not measured:
        gain = "k-NN not measured (--knn-every 0)"
    else:
        first, last = measured[0], measured[-1]
        gain = f"k-NN {first['knn_top1']:.1f} -> {last['knn_top1']:.1f} ({last['knn_top1'] - first['knn_top1']:+.1f})"
        if first["epoch"] != 0 or first is last:  # a log without its untrained line, or only one measurement
            gain += f" (epochs {first['epoch']} to {last['epoch']})"
    when = (f"in {duration(seconds)}" if not resumed_at else "trained before, nothing to train now"
            if epochs is not None and resumed_at >= epochs else f"in {duration(seconds)} since the resume at epoch "
            f"{resumed_at}")
    return f"{gain} {when}; checkpoint {ckpt_path}; next: python eval_linear.py --ckpt {ckpt_path} --random-init"


# ---- linear probe and fine-tuning ----

def cosine_lr(step, total_steps, base_lr, warmup_steps=0):
    """Linear warmup to base_lr, then half a cosine to 0 (SGDR, Loshchilov & Hutter 2016, without restarts)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t))


# Probe defaults: SGD + momentum 0.9, no weight decay, cosine to 0, batch 256, 100 epochs, the recipe of DINO's
# eval_linear.py; lr 0.1 because the features are standardized (DINO's 0.001 x batch/256 is for raw features).
# Chosen on a validation split, never on test: 10% of CIFAR-10 train held out per class (seed 0), mean top-1 of
# a random-init vit_mini/8 and a 3-epoch SimCLR one (benchmarks/probe_lr.py; the README has the command):
# SGD 0.01 42.28, 0.03 43.02, 0.1 43.22, 0.3 42.81, 1.0 42.05; AdamW 1e-3 41.72, 3e-3 42.63, 1e-2 43.15, 3e-2 43.19.
PROBE_LR = {"sgd": 0.1, "adamw": 3e-2}


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes, epochs=100, lr=None,
                 optimizer="sgd", batch_size=256, weight_decay=0.0, seed=0):
    """Train a linear classifier on cached frozen features; returns dict(top1, top5) on the test features.

    Features are standardized with the train mean and std (a BatchNorm without affine, as MAE's linear probe,
    so one learning rate fits every backbone). Mini-batch SGD + momentum (or AdamW), cosine schedule, on the
    features' device. `lr=None` takes PROBE_LR[optimizer].
    """
    if optimizer not in PROBE_LR:
        raise ValueError(f"optimizer must be one of {sorted(PROBE_LR)}, not {optimizer!r}")
    lr = PROBE_LR[optimizer] if lr is None else lr
    device = train_feats.device
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6                    # (D,), (D,)
    x_train, x_test = (train_feats - mean) / std, (test_feats.to(device) - mean) / std
    y_train = train_labels.to(device)
    generator = torch.Generator().manual_seed(seed)                               # same init and batches each run
    clf = nn.Linear(x_train.shape[1], num_classes).to(device)
    with torch.no_grad():
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=generator).mul_(0.01))
        clf.bias.zero_()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    step, total_steps = 0, epochs * steps_per_epoch
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=generator).to(device)
            for i in range(0, n, batch_size):
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, total_steps, lr)
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(clf(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        top1, top5 = accuracy(clf(x_test), test_labels.to(device))
    return {"top1": top1, "top5": top5}


def stratified_split(labels, fraction, seed=0):
    """(train indices, validation indices): `fraction` of each class held out, drawn with `seed`. Settings
    (the probe's learning rate, say) are chosen on the validation part, so the test split is looked at once,
    for the number that gets reported."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(fraction * len(idx))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def finetune(backbone, train_loader, test_loader, num_classes, epochs, lr, device, weight_decay=0.05):
    """Fine-tune a copy of `backbone` + a linear head end to end.

    Returns (dict(top1, top5) on `test_loader`, the fine-tuned nn.Sequential(backbone, head)).
    Every weight trains, the patch projection too where pretraining froze it (MoCo v3 §4.2 freezes it for
    pretraining only); a sin-cos position embedding stays the fixed function it is. AdamW (weight decay 0.05
    on weights, none on norms, biases, CLS token and position embedding, as DeiT/MAE), linear warmup over
    the first 5% of steps then cosine (MAE's FINETUNE.md: 5 of 100 epochs), bf16 on CUDA. The caller's
    backbone is not modified. `train_loader` should augment (random resized crop + flip: data.finetune_spec)
    and yield (images, labels), or ([images], labels) as data.build_train_loader does with one view.
    """
    device = torch.device(device)
    head = nn.Linear(backbone.embed_dim, num_classes)
    nn.init.zeros_(head.weight)                      # zero-init head, as timm's ViT: starts at uniform logits
    nn.init.zeros_(head.bias)
    model = nn.Sequential(copy.deepcopy(backbone), head).to(device)
    model[0].patch_embed.requires_grad_(True)
    model[0].pos_embed.requires_grad_(model[0].kwargs["pos_embed"] == "learned")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    total_steps = epochs * len(train_loader)
    warmup_steps = total_steps // 20
    step = 0
    for epoch in range(epochs):
        model.train()
        data.set_epoch(train_loader, epoch)  # a new order and new augmentations every epoch
        bar = tqdm(train_loader, desc=f"finetune {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for images, labels in bar:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total_steps, lr, warmup_steps)
            images = images[0] if isinstance(images, (list, tuple)) else images  # (B, C, H, W): the one view
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(images)                                            # (B, C)
            loss = F.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise SystemExit(f"finetune: loss {loss.item()} at step {step}, epoch {epoch}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    # the fine-tuned network's logits, read with the same code as features (eval mode, autocast, fp32)
    logits, labels = extract_features(model, test_loader, device)                # (M, C), (M,)
    top1, top5 = accuracy(logits, labels)
    return {"top1": top1, "top5": top5}, model


# ---- checkpoints ----

def describe_arch(kw):
    """'vit_mini/8 @32px' for a preset's width/depth/heads, else 'ViT-D256-L8-H4/4 @32px'."""
    for name, preset in vit.PRESETS.items():
        if all(kw[k] == v for k, v in preset.items()):
            return f"{name}/{kw['patch_size']} @{kw['img_size']}px"
    return f"ViT-D{kw['embed_dim']}-L{kw['depth']}-H{kw['num_heads']}/{kw['patch_size']} @{kw['img_size']}px"


def _timm_vit_kwargs(sd, path, num_heads):
    """VisionTransformer kwargs read off the shapes of a timm / DeiT state dict (heads cannot be: width // 64)."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight"):
        if key not in sd:
            raise SystemExit(f"{path}: expected a checkpoint of this repo (with 'vit_kwargs' and 'backbone') or a "
                             f"timm/DeiT ViT state dict, but found no '{key}' among its {len(sd)} keys "
                             f"(first: {', '.join(list(sd)[:4])})")
    embed_dim = sd["cls_token"].shape[-1]
    in_chans, patch_size = sd["patch_embed.proj.weight"].shape[1], sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    if grid * grid != sd["pos_embed"].shape[1] - 1:
        raise SystemExit(f"{path}: pos_embed has {sd['pos_embed'].shape[1]} tokens, not 1 CLS + a square grid "
                         "(register tokens or no CLS position embedding are not supported)")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    num_heads = num_heads or max(1, embed_dim // 64)  # every timm/DeiT preset uses 64-wide heads
    return dict(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                in_chans=in_chans, pos_embed="learned")


def read_checkpoint(path):
    """torch.load(path, weights_only=True) on the CPU, or a one-line SystemExit naming what is wrong with the file
    (missing, truncated, not a PyTorch file, pickled objects): the training scripts' --resume reads with it too."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"checkpoint not found: {path}") from None
    except Exception as e:  # not a torch file, a truncated one, or pickled objects that weights_only refuses
        obj = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        why = (f"it pickles an object ({obj.group(1)}); only tensors, numbers, strings, lists, dicts load" if obj
               else f"not a PyTorch file, or a truncated / corrupted one ({type(e).__name__})")
        raise SystemExit(f"{path}: not a checkpoint readable with torch.load(weights_only=True): {why}") from None


# Where the moving-average network of a method sits in its checkpoint's "model": DINO's teacher, BYOL's target and
# MoCo's momentum encoder. The network trained by the gradient (student, online network, query encoder) is
# "backbone.*" in every method.
TEACHER_PREFIX = {"dino": "teacher_backbone.", "byol": "target_backbone.", "moco": "momentum_backbone."}


def load_backbone(path, num_heads=None, checkpoint_key=None):
    """(VisionTransformer on CPU in eval mode, meta dict) from a checkpoint file.

    Accepts this repo's checkpoints ({"method", "epoch", "args", "vit_kwargs", "backbone", ...}, any method) and
    plain timm / DeiT ViT state dicts (optionally under "model" or "state_dict", "module." prefixes and the
    classification "head.*" dropped); for those the architecture is read off the tensor shapes, with a learned
    position embedding and `num_heads` = width // 64 unless given. Anything else exits with a one-line message.
    meta: method, epoch, arch, vit_kwargs, pretrain_dataset, pretrain_data_dir, ckpt, mean_std: the input
    normalization it was trained with (its pretraining dataset's; ImageNet's for timm / DeiT weights), and network:
    which of a method's two networks this is ("student" or "teacher"; None for methods with one, and timm weights).
    checkpoint_key (this repo's checkpoints of DINO, BYOL and MoCo): None takes the checkpoint's "backbone" (DINO's
    teacher, as DINO's eval_knn.py; the others' online network, as their papers), "student" the network trained by
    the gradient, "teacher" its moving average.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise SystemExit(f"{path}: expected a dict (a checkpoint of this repo or a ViT state dict), "
                         f"found {type(ckpt).__name__}")

    if "vit_kwargs" in ckpt and "backbone" in ckpt:                               # (a) this repo's checkpoint
        vit_kwargs, sd = dict(ckpt["vit_kwargs"]), ckpt["backbone"]
        args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        meta = {"method": ckpt.get("method", "?"), "epoch": ckpt.get("epoch"),
                "pretrain_dataset": args.get("dataset"), "pretrain_data_dir": args.get("data_dir"),
                "mean_std": data.MEAN_STD.get(args.get("dataset"))}  # what its pixels were normalized with
        has_teacher = meta["method"] in TEACHER_PREFIX and isinstance(ckpt.get("model"), dict)
        # (checkpoints written before DINO's held its teacher as "backbone" say nothing: theirs is the student)
        network = ckpt.get("backbone_network", "student") if has_teacher else None
        if checkpoint_key and not has_teacher:
            raise SystemExit(f"{path}: --checkpoint-key {checkpoint_key}: a {meta['method']} checkpoint has one "
                             f"network (student and teacher: dino, byol, moco)")
        if checkpoint_key and checkpoint_key != network:
            prefix = TEACHER_PREFIX[meta["method"]] if checkpoint_key == "teacher" else "backbone."
            sd, network = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}, checkpoint_key
        meta["network"] = network
    else:                                                                         # (b) a timm / DeiT state dict
        sd = ckpt
        for wrapper in ("model", "state_dict"):
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        sd = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        vit_kwargs = _timm_vit_kwargs(sd, path, num_heads)
        if checkpoint_key:
            raise SystemExit(f"{path}: --checkpoint-key {checkpoint_key}: a plain ViT state dict has one network")
        meta = {"method": os.path.splitext(os.path.basename(path))[0], "epoch": None, "network": None,
                "pretrain_dataset": None, "pretrain_data_dir": None, "mean_std": data.IMAGENET_MEAN_STD}
    try:
        model = vit.VisionTransformer(**vit_kwargs)
        model.load_state_dict(sd, strict=True)
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:  # unknown kwargs, missing keys, shapes
        raise SystemExit(f"{path}: the weights do not fit VisionTransformer({vit_kwargs}): "
                         f"{' '.join(str(e).split())[:300]}") from None
    meta.update(arch=describe_arch(vit_kwargs), vit_kwargs=vit_kwargs, ckpt=str(path))
    return model.eval(), meta


# ---- command line ----

def get_args_parser():
    p = data.script_parser(__doc__, __file__)
    g = p.add_argument_group("models")
    g.add_argument("--ckpt", nargs="+", default=[], metavar="PATH",
                   help="checkpoints to evaluate: this repo's <out>/checkpoint.pt of any method, or a timm/DeiT "
                        "ViT state dict; several give one table (default: no checkpoint)")
    g.add_argument("--random-init", action="store_true",
                   help="also evaluate an untrained network (the baseline): --arch/--patch-size/--img-size, or "
                        "the architecture of the first --ckpt")
    g.add_argument("--arch", choices=sorted(vit.ARCHS), default=None,
                   help="preset for --random-init (default: the first --ckpt's architecture)")
    g.add_argument("--patch-size", type=data.pixel_side, default=4,
                   help="patch size for --random-init --arch (default: %(default)s)")
    g.add_argument("--img-size", type=data.pixel_side, default=None,
                   help="side the images are resized to (default: the backbone's img_size; another multiple of "
                        "the patch size resamples the position embedding); with --arch also the model's size "
                        "(default 32)")
    g.add_argument("--checkpoint-key", choices=["student", "teacher"], default=None,
                   help="which network of a DINO, BYOL or MoCo checkpoint: student (trained by the gradient: the "
                        "online network, the query encoder) or teacher (its moving average: the target, the momentum "
                        "encoder); default: the checkpoint's backbone, DINO's teacher (as its paper and eval_knn.py) "
                        "and the others' student (as theirs)")
    g.add_argument("--num-heads", type=data.positive_int, default=None,
                   help="attention heads of a timm/DeiT state dict (not in its shapes; default: width // 64)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["cifar10", "cifar100", "stl10", "folder"], default=None,
                   help="evaluation data (default: the first checkpoint's pretraining dataset; another one "
                        "measures transfer). 'folder' is an ImageFolder tree with train/ and test/")
    g.add_argument("--data-dir", default=None,
                   help="dataset root (default: the first checkpoint's pretraining --data-dir)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch cifar10/cifar100/stl10 into --data-dir when missing (needs internet); "
                        "--no-download: stop with an error instead")
    g.add_argument("--batch-size", type=data.positive_int, default=256,
                   help="images per batch, features and fine-tuning (default: %(default)s)")
    g.add_argument("--workers", type=data.worker_count, default=min(8, os.cpu_count() or 1),
                   help="data loading processes (default: %(default)s)")
    g = p.add_argument_group("protocols")
    g.add_argument("--knn-k", type=data.positive_int, default=20,
                   help="neighbours of the weighted k-NN (InstDisc, DINO: 20)")
    g.add_argument("--knn-temperature", type=data.positive_float, default=0.07,
                   help="T in the neighbour weight exp(cos / T) (InstDisc, DINO: 0.07)")
    g.add_argument("--no-probe", action="store_true", help="skip the linear probe (k-NN only, or + --finetune)")
    g.add_argument("--probe-epochs", type=data.epoch_count, default=100,
                   help="linear-probe epochs on cached features (default: %(default)s)")
    g.add_argument("--probe-optimizer", choices=sorted(PROBE_LR), default="sgd",
                   help="linear-probe optimizer; sgd has momentum 0.9 as DINO (default: %(default)s)")
    g.add_argument("--probe-lr", type=data.positive_float, default=None,
                   help=f"linear-probe peak learning rate, cosine to 0 (default: {PROBE_LR}, chosen on a 10%% "
                        "validation split of CIFAR-10 train, never on test: benchmarks/probe_lr.py)")
    g.add_argument("--probe-weight-decay", type=data.nonneg_float, default=0.0,
                   help="linear-probe weight decay (default: %(default)s, as DINO)")
    g.add_argument("--finetune", action="store_true", help="also fine-tune the whole network (slow)")
    g.add_argument("--finetune-epochs", type=data.epoch_count, default=100,
                   help="fine-tuning epochs (default: %(default)s, as MAE)")
    g.add_argument("--finetune-lr", type=data.positive_float, default=5e-4,
                   help="fine-tuning peak AdamW learning rate per 256 images (MAE's base lr 5e-4): the run uses "
                        "finetune-lr * batch-size / 256")
    g.add_argument("--aug", default="auto", choices=["auto", "batched", "pil"],
                   help="how fine-tuning's views are made, as in the training scripts: batched on the device from "
                        "the train split decoded once, or pil in --workers processes; auto: batched where it fits "
                        "(default: %(default)s)")
    g.add_argument("--label-fraction", type=data.label_fraction, default=None, metavar="F",
                   help="the few-label case: k-NN, probe and fine-tuning see the labels of a stratified fraction F "
                        "of the train split only (F of every class, drawn with --label-seed: "
                        "stratified_split(labels, F)'s held-out part); --val-fraction then carves its validation "
                        "images out of these (default: every train label)")
    g.add_argument("--label-seed", type=data.seed_int, default=None,
                   help="seed of the --label-fraction draw (default: --seed)")
    g.add_argument("--val-fraction", type=data.fraction, default=None, metavar="F",
                   help="hold out a fraction F of every class of the train split (--seed) and report accuracy on "
                        "it instead of the test split: choose probe or fine-tuning settings with this, then "
                        "report the test number once (default: off, the test split)")
    g = p.add_argument_group("run")
    g.add_argument("--device", type=data.device_name, default="auto",
                   help="auto (cuda, then mps, then cpu) or a torch device like cuda:1 (default: %(default)s)")
    g.add_argument("--seed", type=data.seed_int, default=0,
                   help="seeds --random-init, the probe, fine-tuning and --val-fraction (default: %(default)s)")
    g.add_argument("--results", default=None, metavar="FILE.jsonl",
                   help="append one JSON line per evaluated model (all numbers, settings, the command) to "
                        "this file, e.g. runs/results.jsonl to collect every evaluation (default: off)")
    return p


def resolve_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(name, device, announce=False):
    """The training scripts' --precision: "auto" is bf16 on a GPU that has it (Ampere and newer) and fp16 with a
    gradient scaler on one that does not (a T4, Colab's free GPU, or a V100); an explicit choice is kept. Off CUDA
    autocast is not used: fp32. announce: say once what "auto" chose and why."""
    if device.type != "cuda":
        return "fp32"
    if name != "auto":
        return name
    chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if announce:
        print(f"precision: {chosen} autocast" + (" (this GPU has bf16)" if chosen == "bf16" else
              " with a gradient scaler (this GPU has no bf16)") + "; --precision fp32 turns it off")
    return chosen


def markdown_table(rows, finetune):
    cols = ["method", "epochs", "arch", "eval data", "k-NN top-1", "linear top-1", "linear top-5"]
    cols += ["finetune top-1"] if finetune else []
    fmt = lambda x: "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["label"], r["epoch"], r["arch"], r["eval_data"], r["knn_top1"], r["linear_top1"],
                 r["linear_top5"]] + ([r["finetune_top1"]] if finetune else [])
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    print("eval_linear.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if not args.ckpt and not args.random_init:
        raise SystemExit("nothing to evaluate: give --ckpt PATH [PATH ...] and/or --random-init")
    device = resolve_device(args.device)

    # ---- models ----
    models = [load_backbone(path, args.num_heads, args.checkpoint_key) for path in args.ckpt]  # [(backbone, meta)]
    if args.random_init:
        torch.manual_seed(args.seed)
        if args.arch is not None:
            if (args.img_size or 32) % args.patch_size:
                raise SystemExit(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
            backbone = vit.ARCHS[args.arch](img_size=args.img_size or 32, patch_size=args.patch_size).eval()
        elif models:
            backbone = vit.VisionTransformer(**models[0][1]["vit_kwargs"]).eval()
        else:
            raise SystemExit("--random-init needs --arch (or a --ckpt whose architecture it copies)")
        kw = backbone.kwargs
        if models and describe_arch(kw) != models[0][1]["arch"]:  # allowed, but not the like-for-like baseline
            print(f"note: --random-init builds {describe_arch(kw)}, not the checkpoint's {models[0][1]['arch']}: "
                  f"drop --arch for the same architecture untrained")
        models.insert(0, (backbone, {"method": "random init", "epoch": 0, "network": None, "arch": describe_arch(kw),
                                     "vit_kwargs": kw, "pretrain_dataset": None, "pretrain_data_dir": None,
                                     "mean_std": None, "ckpt": None}))

    for _, meta in models:  # a size the patches do not tile: one line here, not a traceback from the first batch
        size, patch = args.img_size or meta["vit_kwargs"]["img_size"], meta["vit_kwargs"]["patch_size"]
        if size % patch:
            raise SystemExit(f"--img-size {size} is not a multiple of the patch size {patch} of {meta['method']} "
                             f"({meta['arch']}): use a multiple of {patch}")

    # ---- data ----
    first = next((m for _, m in models if m["ckpt"] is not None), {})
    dataset = args.dataset or first.get("pretrain_dataset")
    same_as_pretraining = dataset == first.get("pretrain_dataset")
    data_dir = args.data_dir or (first.get("pretrain_data_dir") if same_as_pretraining else None)
    if dataset is None:
        raise SystemExit("which data? give --dataset (and --data-dir); no checkpoint names its pretraining data")
    if data_dir is None and dataset == "folder":
        raise SystemExit("--dataset folder needs --data-dir <dir with train/<class>/*.jpg and test/<class>/*.jpg>")
    label_seed = args.seed if args.label_seed is None else args.label_seed
    data_dir = data_dir or "data"  # torchvision's datasets: where --download puts them
    eval_data = f"folder:{os.path.basename(os.path.normpath(data_dir))}" if dataset == "folder" else dataset
    eval_data += f" ({args.label_fraction:g} of the train labels)" if args.label_fraction else ""
    eval_data += f" (val {args.val_fraction:g} of train)" if args.val_fraction else ""
    loaders = {}  # (img_size, normalization) -> (train, test, train-augmented or None, num_classes)

    def get_loaders(img_size, mean_std):
        if (img_size, mean_std) not in loaders:
            train_set = data.build_dataset(dataset, data_dir, "train", download=args.download)
            test_set = data.build_dataset(dataset, data_dir, "test", download=args.download)
            num_classes = data.num_classes(train_set)
            # fine-tuning's views: batched on the device or PIL in workers (data.build_train_loader, --aug)
            aug_set = data.build_dataset(dataset, data_dir, "train") if args.finetune else None  # its own transform
            labels = data.labels(train_set)
            if args.label_fraction:  # the labelled images: every protocol sees these and no other train image
                _, labelled = stratified_split(labels, args.label_fraction, label_seed)
                labels = labels[labelled]
                train_set, aug_set = Subset(train_set, labelled), aug_set and Subset(aug_set, labelled)
            if args.val_fraction:  # the evaluation set is carved out of train; test stays unseen
                train_idx, val_idx = stratified_split(labels, args.val_fraction, args.seed)
                train_set, test_set = Subset(train_set, train_idx), Subset(train_set, val_idx)
                aug_set = aug_set and Subset(aug_set, train_idx)
            check_labels(data.labels(train_set), data.labels(test_set), f"evaluating on {eval_data}")
            aug = aug_set and data.build_train_loader(aug_set, [data.finetune_spec(img_size)], *mean_std,
                                                      args.batch_size, args.workers, device, seed=args.seed,
                                                      aug=args.aug, announce=True)
            if aug is not None and len(aug) == 0:  # no step at all: the zero-initialized head would be "the result"
                raise SystemExit(f"--finetune: {len(aug_set)} training images make no full batch of --batch-size "
                                 f"{args.batch_size}")
            loaders[img_size, mean_std] = (data.build_eval_loader(train_set, img_size, *mean_std, args.batch_size,
                                                                  args.workers),
                                           data.build_eval_loader(test_set, img_size, *mean_std, args.batch_size,
                                                                  args.workers),
                                           aug, num_classes)
        return loaders[img_size, mean_std]

    # ---- evaluate ----
    rows = []
    for backbone, meta in models:
        t0 = time.time()
        img_size = args.img_size or meta["vit_kwargs"]["img_size"]
        # the pixels normalized as in pretraining (ImageNet's for timm weights), else as the evaluation data
        mean_std = tuple(map(tuple, meta["mean_std"] or data.MEAN_STD[dataset]))
        train_loader, test_loader, aug_loader, num_classes = get_loaders(img_size, mean_std)
        backbone.to(device)
        train_feats, train_labels = extract_features(backbone, train_loader, device)   # (N, D), (N,)
        test_feats, test_labels = extract_features(backbone, test_loader, device)      # (M, D), (M,)
        knn_top1, knn_top5 = knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes,
                                          args.knn_k, args.knn_temperature)
        probe = {"top1": None, "top5": None}
        if not args.no_probe:
            probe = linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes,
                                 epochs=args.probe_epochs, lr=args.probe_lr, optimizer=args.probe_optimizer,
                                 weight_decay=args.probe_weight_decay, seed=args.seed)
        ft, finetune_lr = {"top1": None, "top5": None}, args.finetune_lr * args.batch_size / 256
        if args.finetune:
            torch.manual_seed(args.seed)
            ft, _ = finetune(backbone, aug_loader, test_loader, num_classes, args.finetune_epochs, finetune_lr,
                             device)
        backbone.cpu()
        same_data = meta["pretrain_dataset"] == dataset and (dataset != "folder" or os.path.realpath(
            str(meta["pretrain_data_dir"])) == os.path.realpath(data_dir))
        transfer = meta["pretrain_dataset"] is not None and not same_data
        label = meta["method"] + (f" ({meta['network']})" if meta["network"] else "")  # dino (teacher)
        row = {"ckpt": meta["ckpt"], "method": meta["method"], "network": meta["network"], "label": label,
               "epoch": meta["epoch"], "arch": meta["arch"],
               "vit_kwargs": meta["vit_kwargs"], "pretrain_dataset": meta["pretrain_dataset"],
               "dataset": dataset, "data_dir": data_dir,
               "eval_data": eval_data + (" (transfer)" if transfer else ""),
               "transfer": transfer, "img_size": img_size, "normalization": {"mean": list(mean_std[0]), "std": list(mean_std[1])},
               "val_fraction": args.val_fraction, "label_fraction": args.label_fraction,
               "label_seed": label_seed if args.label_fraction else None, "num_train": len(train_labels),
               "num_test": len(test_labels), "knn_k": args.knn_k, "knn_temperature": args.knn_temperature,
               "knn_top1": knn_top1, "knn_top5": knn_top5, "linear_top1": probe["top1"],
               "linear_top5": probe["top5"],
               "probe": None if args.no_probe else {"epochs": args.probe_epochs, "optimizer": args.probe_optimizer,
                                                    "lr": args.probe_lr or PROBE_LR[args.probe_optimizer],
                                                    "weight_decay": args.probe_weight_decay},
               "finetune_top1": ft["top1"], "finetune_top5": ft["top5"],
               "finetune": {"epochs": args.finetune_epochs, "lr": finetune_lr} if args.finetune else None,
               "seed": args.seed, "device": str(device), "seconds": round(time.time() - t0, 1),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": "python eval_linear.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        rows.append(row)
        probe_msg = "" if args.no_probe else f", linear {probe['top1']:.2f} / {probe['top5']:.2f}"
        ft_msg = f", finetune {ft['top1']:.2f}" if args.finetune else ""
        print(f"{label}, {meta['arch']}, on {row['eval_data']}: k-NN {knn_top1:.2f}{probe_msg}{ft_msg} "
              f"[{row['seconds']:.0f} s]")
        if args.results:
            os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")

    print()
    print(markdown_table(rows, args.finetune))
    return rows


if __name__ == "__main__":
    main()

r"""SwAV: online clustering with swapped assignments between multi-crop views.

Paper: Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020, https://arxiv.org/abs/2006.09882

The method: every image is cropped into 2 global views and a few small ones (multi-crop, §3.2); all go through
the same encoder (here a ViT, CLS token) and an MLP, whose L2-normalized output z is scored against K learnable
unit-length prototypes (cosines). The codes of the two global crops are computed online by Sinkhorn-Knopp
(§3.1, Eq. 3): soft cluster assignments under the constraint that the batch is split equally among the K
prototypes. Each global crop's code is then predicted from every other crop's scores by a softmax at
temperature 0.1 (the "swapped prediction", Eq. 1-2). No negatives; equipartition is what prevents collapse.
Collapse (every image on the same point) sits at loss ln K (6.91 for K = 1000): Sinkhorn can only spread a
collapsed batch uniformly over the prototypes, which is trivial to predict. The log's codes_entropy is then
ln K and prototypes_used (distinct nearest prototypes of the batch's global crops) is 1; embed_std, the
per-dimension std of the L2-normalized CLS feature, is 0 at collapse and at most 1/sqrt(D) (0.072 for D = 192).

Run:
    python swav.py --epochs 100      # one GPU, ViT-Tiny/4 on CIFAR-10 (downloaded into ./data the first time)
    python swav.py --dataset folder --data-dir tests/data_sample --arch vit_mini --patch-size 8 \
        --epochs 3 --warmup-epochs 1 --batch-size 128 --out runs/swav_demo   # offline CPU demo
    torchrun --nproc_per_node=4 swav.py --batch-size 1024 ...    # 4 GPUs; --batch-size is the total
    python eval_linear.py --ckpt runs/swav/checkpoint.pt          # k-NN + linear probe

Differences from the paper:
  - ViT (CLS token) on 32 px images instead of ResNet-50 at 224 px; multi-crop 2x32 + 6x16 px instead of
    2x224 + 6x96 px (the same ratio of small to large side, rounded to a multiple of the patch size). A small
    crop's sin-cos position embedding spans the global grid's field at fractional positions (vit.py). No small
    crops by default where one would be fewer than 4x4 patches (vit_mini/8's 16 px: 2x2), where they cost
    k-NN points here (see --num-small-crops); the paper's 96 px crops are 6x6 patches of 16.
  - AdamW instead of LARS (LARS is unstable with ViTs, MoCo v3 §5), lr 5e-4 * batch / 256, cosine decay to 0
    (the reference scripts end at base lr / 1000), 10 warmup epochs (the reference's batch-4096 recipe; its
    batch-256 script has none); weight decay 0.05 (DeiT/DINO's AdamW value) instead of 1e-6, and none on
    biases, norms, the CLS token and the position embedding (the reference decays every parameter).
  - Batch 256 on one GPU instead of 4096, with the reference code's small-batch measures: prototypes frozen
    for the first epoch, a queue of 3840 past features for the codes from epoch 15 (its batch-256 recipe).
  - At this batch the paper's epsilon 0.05 and colour distortion 1.0 collapse a short run (the loss sits at
    ln K, a handful of prototypes take every image); epsilon 0.02 (sharper codes, the reference README's
    first advice) and colour strength 0.5 (SimCLR's CIFAR-10 value) learn. Measured: get_args_parser().
  - K = 1000 prototypes instead of 3000 (see --num-prototypes).
  - The head's first Linear has no bias (a BatchNorm follows it).
  - Sinkhorn subtracts each prototype's largest score before the exp (the reference exponentiates the raw
    scores): the same codes, without the fp32 underflow of a batch gathered around one prototype.
  - Gradient clipping at a total norm of 3.0 (--clip-grad; 0: off); the reference does not clip. 3.0 is
    DINO's --clip_grad, which DINO applies to each parameter's gradient on its own (utils.clip_gradients), so
    the total-norm clip here is the stricter of the two. In the README's CPU protocol (seed 0, 6 small crops)
    it never acted: the run without it has the same loss and k-NN to the last digit (6.36498, 30.58); kept
    as a bound on a rare bad step of a long run.
  - bf16 autocast on a GPU that has it (--precision auto; fp16 with a scaler on one that has not); the
    reference trains in fp16 (apex O1, --use_fp16 true).
  - Global BN (SyncBatchNorm) only on CUDA: under torchrun on CPU each process normalizes its own batch.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval_linear
import vit


# ---- loss ----
@torch.no_grad()
def sinkhorn(scores, epsilon, iterations, distributed=False):
    """Codes from prototype scores by Sinkhorn-Knopp (§3.1, Eq. 3; the reference code's distributed_sinkhorn).

    scores: (B, K) cosines of B samples with K prototypes. Returns Q: (B, K), each row summing to 1 (a soft
    assignment of a sample) and each column to about B/K (equipartition: every prototype gets an equal share),
    Q = diag(u) exp(scores / epsilon) diag(v) after `iterations` rounds of alternate rescaling.
    distributed: this process holds its share of the batch; the sums over samples are all-reduced, so the
        equipartition holds over all processes' samples (B = the global count).
    fp32, no gradient: the codes are targets. Each prototype's largest score over the batch (all processes'
    samples) is subtracted before the exp: that multiplies row k of exp(scores / epsilon) by a constant, which
    the first row normalization cancels exactly (iterations >= 1), so the codes are the paper's. Without it, a
    batch gathered around one prototype puts e^50 next to e^-50 at epsilon 0.02, and after the division by the
    total a prototype far from every sample falls below fp32's smallest number (its row loses its precision).
    """
    world = dist.get_world_size() if distributed else 1

    def sum_over_processes(x):
        if distributed:
            dist.all_reduce(x)
        return x

    scores = scores.float()                                            # (B, K) this process's samples
    top = scores.max(dim=0).values                                     # (K,) each prototype's best score ...
    if distributed:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)                     # ... over all processes' samples
    # Q stays a joint distribution over (prototype, sample) as the paper writes it; the divisions by K and B are
    # uniform factors that the next normalization cancels, only the row and column sums shape the codes
    Q = torch.exp((scores - top) / epsilon).T                          # (K, B) the paper's orientation, <= 1
    K, B = Q.shape[0], Q.shape[1] * world                              # B: samples over all processes
    Q /= sum_over_processes(Q.sum())                                   # a joint distribution: sums to 1
    for _ in range(iterations):
        Q /= sum_over_processes(Q.sum(dim=1, keepdim=True))           # (K, 1) each prototype's mass ...
        Q /= K                                                         # ... becomes 1/K
        Q /= Q.sum(dim=0, keepdim=True)                                # (1, B) each sample's mass ...
        Q /= B                                                         # ... becomes 1/B (exact: it comes last)
    return (Q * B).T                                                   # (B, K) rows sum to 1: assignments


def swav_loss(scores, codes, temperature):
    """Swapped prediction (Eq. 1-2), averaged as the reference code: for each crop a that has a code, the mean
    over the other V-1 crops v of the cross-entropy between a's code and softmax(v's scores / temperature),
    then the mean over the A assigned crops.

    scores: (V, B, K) cosines of every crop with the prototypes (the first A crops are the global ones).
    codes: (A, B, K) Sinkhorn codes of the first A crops (no gradient).
    """
    V, A = scores.shape[0], codes.shape[0]
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)              # (V, B, K) each crop's prediction
    ce = -(codes[:, None] * log_p[None]).sum(dim=-1).mean(dim=-1)            # (A, V) mean over B of -q . log p
    others = ~torch.eye(A, V, dtype=torch.bool, device=scores.device)       # (A, V) a crop never predicts itself
    return ce[others].mean()                       # A * (V-1) terms: 1/(V-1) per code, then 1/A over the codes


# ---- model ----
class SwAV(nn.Module):
    def __init__(self, backbone, hidden_dim, out_dim, num_prototypes):
        super().__init__()
        self.backbone = backbone
        # projection head of the paper's code (src/resnet50.py): Linear-BN-ReLU-Linear, output 128, then L2-norm
        self.head = nn.Sequential(
            nn.Linear(backbone.embed_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        # prototypes C: K rows of a bias-free Linear (the reference's), re-normalized to unit length every step
        # by train_one_epoch, so that scores are cosines
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)

    def forward(self, crops):                               # V tensors (B, C, H_v, W_v), same sizes consecutive
        # one backbone call per crop size, as the reference's multi-resolution forward: a ViT batch needs one
        # sequence length, and vit.py recomputes the sin-cos position embedding for the small crops' grid (at
        # fractional positions spanning the global grid's field: a small crop is a whole picture, smaller)
        cuts = [0] + [v for v in range(1, len(crops)) if crops[v].shape[-2:] != crops[v - 1].shape[-2:]]
        cuts.append(len(crops))
        h = torch.cat([self.backbone(torch.cat(crops[a:b])) for a, b in zip(cuts, cuts[1:])])  # (V*B, D) CLS
        with torch.autocast(h.device.type, enabled=False):  # BatchNorm statistics and cosines in fp32
            z = F.normalize(self.head(h.float()), dim=1)    # (V*B, out_dim) on the unit sphere
            scores = self.prototypes(z)                     # (V*B, K) cosines with the unit prototypes
        return h, z, scores


# ---- helpers (written out in each method file on purpose: a diff between methods shows the papers' changes) ----
def cosine_schedule(step, total_steps, warmup_steps, base_value, final_value=0.0):
    """Linear warmup from 0 to base_value, then half a cosine down to final_value."""
    if step < warmup_steps:
        return base_value * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model, weight_decay):
    """AdamW's two groups: weight_decay on every trainable parameter of 2 or more dimensions, 0 on biases and
    norms (1-D) and on the CLS token and position embedding, DeiT's rule (timm's no_weight_decay). DINO's
    get_params_groups exempts only biases and norms (it decays the tokens), MoCo v3's AdamW decays everything,
    and so does SwAV's SGD + LARC. Parameters with requires_grad False are in neither group."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_checkpoint(path, ckpt):
    """Write to a temporary file, then rename: an interrupted save never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def default_small_crops(small_crop_size, img_size, patch_size):
    """--num-small-crops when it is not given: the paper's 6 where a small crop is a grid of at least 4x4 patches
    (the paper's 96 px crops are 6x6 patches of 16) and at most half the global crop's side (the paper's: 0.43),
    else none (see --num-small-crops)."""
    return 6 if small_crop_size // patch_size >= 4 and 2 * small_crop_size <= img_size else 0


def get_args_parser():
    p = data.script_parser(__doc__, __file__)
    # shared flags (same names in every method file)
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder"],
                   help="a torchvision dataset (fetched into --data-dir), or folder: an ImageFolder tree")
    p.add_argument("--data-dir", default="data", help="dataset root; for 'folder' a tree with train/ and test/")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch cifar10/cifar100/stl10 into --data-dir when missing (needs internet); "
                        "--no-download: stop with an error instead")
    p.add_argument("--arch", default="vit_tiny", choices=sorted(vit.ARCHS), help=vit.describe_presets())
    p.add_argument("--patch-size", type=data.pixel_side, default=4, help="4 on 32 px CIFAR: 64 tokens")
    p.add_argument("--img-size", type=data.pixel_side, default=32, help="global crop size (paper: 224)")
    p.add_argument("--freeze-patch-embed", action="store_true",
                   help="keep the random patch projection fixed (MoCo v3 §4.2 stability trick)")
    p.add_argument("--epochs", type=data.epoch_count, default=100,
                   help="paper: 100-800 at batch 4096; 200 at batch 256")
    p.add_argument("--batch-size", type=data.positive_int, default=256,
                   help="total over all processes (paper: 4096; the reference code's small-batch recipe: 256)")
    p.add_argument("--lr", type=data.positive_float, default=5e-4,
                   help="AdamW lr per 256 images; the run uses lr * batch-size / 256 (paper: LARS 4.8 at 4096, "
                        "0.6 at 256)")
    p.add_argument("--weight-decay", type=data.nonneg_float, default=0.05,
                   help="AdamW decoupled decay (DeiT/DINO's 0.05; paper: 1e-6 with LARS)")
    p.add_argument("--warmup-epochs", type=data.nonneg_int, default=10,
                   help="linear lr warmup (paper: 10 at batch 4096)")
    p.add_argument("--workers", type=data.worker_count, default=4,
                   help="PIL loader processes per GPU (--aug pil, and the k-NN monitor's loaders)")
    p.add_argument("--aug", default="auto", choices=["auto", "batched", "pil"],
                   help="how the views are made, from the same recipe: batched (on the training device, a batch at a "
                        "time, from the training set decoded once into memory) or pil (per image, in --workers "
                        "loader processes); auto: batched where the decoded set fits in 2 GB (CIFAR: 150 MB) and its "
                        "images have one size, else pil")
    p.add_argument("--gpu-aug", dest="aug", action="store_const", const="batched", default=argparse.SUPPRESS,
                   help="old name of --aug batched")
    p.add_argument("--out", default="runs/swav", help="folder for checkpoint.pt and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype on CUDA; auto: bf16 where the GPU has it, else fp16 with a gradient scaler "
                        "(T4, V100); CPU and MPS run in fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster GPU steps)")
    p.add_argument("--knn-every", type=data.nonneg_int, default=10,
                   help="k-NN accuracy every N epochs and at the end; 0: never")
    p.add_argument("--val-fraction", type=data.holdout_fraction, default=0.0, metavar="F",
                   help="the k-NN monitor's queries: F of every class of the train split, held out of its memory "
                        "bank, instead of the test split; for choosing settings without reading test (pretraining "
                        "still sees those images, without labels); 0: the test split")
    p.add_argument("--seed", type=data.seed_int, default=0,
                   help="the model's init, the shuffle and every view: (seed, epoch, image) fixes the views")
    p.add_argument("--device", type=data.device_name, default=None,
                   help="cuda, cuda:N, mps or cpu (default: the best available: cuda, then mps, then cpu)")
    # SwAV's own. What the small-batch defaults rest on: 10,000-image CIFAR-10 subset, vit_mini/8, batch 256,
    # 2 epochs without small crops, K 1000, prototypes frozen; k-NN top-1 on its test split (random init 28.9):
    #   colour 1.0, epsilon 0.05 or 0.02, queue from step 15: 6 of 1000 prototypes used, loss above ln K (stopped)
    #   colour 0.5, epsilon 0.05: k-NN 29.5, 111 prototypes used; colour 0.5, epsilon 0.02: k-NN 32.0, 162 used
    #   the same with the queue from epoch 2: loss 6.17 instead of 6.30 but 99 prototypes used, k-NN 31.3
    p.add_argument("--temperature", type=data.positive_float, default=0.1,
                   help="softmax temperature of the prediction (paper: 0.1)")
    p.add_argument("--epsilon", type=data.positive_float, default=0.02,
                   help="Sinkhorn entropy weight, smaller: sharper codes (paper: 0.05; the reference README's first "
                        "advice when the loss sticks at ln K is to lower it; 0.02 learned best at batch 256 here)")
    p.add_argument("--sinkhorn-iterations", type=data.int_range(1, 1000), default=3,
                   help="Sinkhorn-Knopp iterations (paper: 3)")
    p.add_argument("--hidden-dim", type=data.width_int, default=2048, help="projection head width (paper: 2048)")
    p.add_argument("--out-dim", type=data.width_int, default=128,
                   help="projection output, the prototypes' width (paper: 128)")
    p.add_argument("--color-strength", type=data.strength, default=0.5,
                   help="colour distortion strength s of every crop (paper: 1.0; 0.5 is SimCLR's CIFAR-10 value: at "
                        "batch 256, 1.0 collapsed here)")
    p.add_argument("--num-prototypes", type=data.width_int, default=1000,
                   help="K, the number of clusters (paper: 3000 on ImageNet; on CIFAR-10 lightly's benchmark uses "
                        "512 without a queue, solo-learn 3000 with a 3840 queue; 1000 lies between and learns here)")
    p.add_argument("--num-small-crops", type=data.crop_count, default=None,
                   help="small crops per image besides the 2 global ones (paper: 6); 0: no multi-crop. Default: 6 "
                        "where a small crop (--small-crop-size) is at least 4x4 patches and at most half the global "
                        "side (ViT-Tiny/4 at 32 px: 16 px crops), else 0 (vit_mini/8 at 32 px: 4x4 patches are the "
                        "whole image; its 2x2-patch crops cost 3.5 k-NN points in the README's CPU protocol, 30.6 vs "
                        "34.1, untrained 28.6, at twice the cost)")
    p.add_argument("--small-crop-size", type=data.pixel_side, default=None,
                   help="small crop side in pixels, a multiple of --patch-size. Default: the paper's 96/224 of "
                        "--img-size rounded to the patch grid and raised to 4x4 patches (data.small_crop_side): 16 "
                        "at 32 px with patch 4 (13.7 rounds to 12, raised to 16), 32 with patch 8")
    p.add_argument("--freeze-prototypes-epochs", type=data.nonneg_int, default=1,
                   help="the prototypes get no update in this many first epochs, whatever the dataset and batch "
                        "(reference code: its first epoch, --freeze_prototypes_niters 313 ImageNet steps at batch "
                        "4096, 5005 at 256); 0: they train from the first step")
    p.add_argument("--queue", type=data.queue_size, default=3840,
                   metavar="Q", help="Q past features per global crop that join the batch for the codes only; 0: "
                        "off; trimmed to a multiple of --batch-size (reference README: 3840 = 15 x 256 at batch 256)")
    p.add_argument("--queue-start-epoch", type=data.nonneg_int, default=15,
                   help="the queue fills from this epoch on (reference code: 15 of 200; no gain in short runs here)")
    p.add_argument("--clip-grad", type=data.nonneg_float, default=3.0, help="max gradient norm (DINO's 3.0); 0: off")
    return p


def train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, epoch, args, queue=None):
    """One epoch of SwAV's Algorithm 1 (and the reference code's train()), step by step. `model` is the SwAV
    module, `train_model` the same wrapped for the run (DistributedDataParallel, torch.compile) or itself.
    queue: (2, Q, out_dim) past features of the two global crops of this process (updated in place), or None.
    Returns the epoch's averages."""
    device = next(model.parameters()).device
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    precision = eval_linear.resolve_precision(args.precision, device)  # main() resolved it already; tests may not
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    use_amp = device.type == "cuda" and amp_dtype is not None
    model.train()
    data.set_epoch(loader, epoch)  # this epoch's shuffle and augmentations (without it: the first one's again)
    t0, seen, loss_sum, std_sum, entropy_sum, used_sum = time.time(), 0, 0.0, 0.0, 0.0, 0.0
    grad_norms = []  # before clipping, one per step: how often --clip-grad acted
    bar = tqdm(loader, desc=f"swav {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True)
    for it, (crops, _) in enumerate(bar):
        # 1. schedule: the learning rate of this global step; the prototypes back on the unit sphere (C is
        # normalized before every forward in the reference code, main_swav.py's train())
        step = epoch * len(loader) + it
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step)
        with torch.no_grad():
            model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))

        # 2. all crops: 2 global, then the small ones; one backbone pass per size, one head pass for all
        crops = [x.to(device, non_blocking=True) for x in crops]                  # V x (B, C, H_v, W_v)
        B, V = crops[0].shape[0], len(crops)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            h, z, scores = train_model(crops)                                     # (V*B, D), (V*B, out), (V*B, K)
        scores = scores.view(V, B, -1)                                            # (V, B, K)

        # 3. codes of the two global crops by Sinkhorn-Knopp over the batch (all processes' batches) and, once
        # the queue is full, its past features scored with today's prototypes (they count for the
        # equipartition only: the codes kept are the batch's)
        z = z.detach().view(V, B, -1)                                             # (V, B, out_dim)
        codes = []
        for i in range(2):
            s = scores[i].detach()                                                # (B, K)
            if queue is not None:
                if queue[i, -1].any():  # full: the last slot holds a feature (unit vectors are never 0)
                    s = torch.cat([queue[i] @ model.prototypes.weight.detach().T, s])  # (Q + B, K)
                queue[i] = torch.cat([z[i], queue[i, :-B]])                       # newest first, oldest out
            codes.append(sinkhorn(s, args.epsilon, args.sinkhorn_iterations, distributed)[-B:])  # (B, K)
        codes = torch.stack(codes)                                                # (2, B, K)

        # 4. swapped prediction: each global crop's code from every other crop's scores
        loss = swav_loss(scores, codes, args.temperature)

        # 5. backward, clip, step; the prototypes stay where they are for the first epoch(s) (the reference
        # cancels their gradient: a moving target while the network is random invites collapse); a non-finite
        # loss or gradient stops the run before it reaches a checkpoint
        # (loss, gradient norm and the collapse monitors come back to the CPU together: the step's one sync)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if step < args.freeze_prototypes_epochs * len(loader):  # epochs in steps of this loader
            model.prototypes.weight.grad = None  # AdamW skips a parameter without gradient: no decay either
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or float("inf"))
        # the collapse monitors (see step 6): which prototype is nearest to each global crop (all in one
        # cluster: 1 used) and the codes' entropy (ln K when Sinkhorn has nothing but the uniform assignment)
        embed_std = F.normalize(h[:2 * B].detach().float(), dim=1).std(dim=0).mean()
        used = torch.bincount(scores[:2].detach().argmax(dim=-1).flatten(), minlength=scores.shape[-1])  # (K,)
        if distributed:
            dist.all_reduce(used)
        entropy = -(codes * codes.clamp_min(1e-12).log()).sum(dim=-1).mean()     # nats, mean over 2B codes
        loss_value, grad_value, std_value, used_value, entropy_value = torch.stack(
            [loss.detach(), grad_norm.float(), embed_std, (used > 0).sum().float(), entropy]).tolist()
        # (an fp16 gradient scaler skips overflowing steps itself: there an inf gradient is routine)
        for name, value in (("loss", loss_value), ("gradient norm", None if scaler.is_enabled() else grad_value)):
            if value is not None and not math.isfinite(value):
                raise SystemExit(f"error: {name} is {value} at epoch {epoch + 1}, step {step}; stopping before "
                                 f"it reaches a checkpoint (try a lower --lr, or --precision fp32)")
        scaler.step(optimizer)
        scaler.update()

        # 6. log: loss and the collapse monitors; embed_std is the per-dimension std of the normalized CLS
        # feature of the global crops, the representation the k-NN and eval_linear see (as in the other methods)
        seen += B * world
        loss_sum += loss_value
        grad_norms.append(grad_value)
        std_sum += std_value
        entropy_sum += entropy_value
        used_sum += used_value
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        used=f"{used_value:.0f}", img_s=f"{seen / (time.time() - t0):.0f}")

    means = torch.tensor([loss_sum, std_sum, entropy_sum], device=device) / len(loader)
    if distributed:  # each process saw its share of the global batch: average over processes
        dist.all_reduce(means)
        means /= world
    seconds = time.time() - t0
    finite = [g for g in grad_norms if math.isfinite(g)]  # (an fp16 step the scaler skipped has an inf norm)
    clip = {"grad_norm": sum(finite) / max(1, len(finite)), "grad_norm_max": max(finite, default=0.0),
            "clipped": sum(g > args.clip_grad for g in finite) / max(1, len(finite)) if args.clip_grad else 0.0}
    return {"loss": means[0].item(), "lr": optimizer.param_groups[0]["lr"], "embed_std": means[1].item(),
            "codes_entropy": means[2].item(), "prototypes_used": used_sum / len(loader),
            "img_per_s": seen / seconds, "seconds": seconds, **clip}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    started = time.time()

    # ---- setup: processes, device, precision ----
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1  # launched by torchrun with several processes
    if distributed:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if args.device not in (None, "cuda", "cpu"):
            raise SystemExit(f"error: under torchrun --device is cuda or cpu (one GPU per process), not {args.device}")
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        rank, world = 0, 1
        device = eval_linear.resolve_device(args.device or "auto")  # cuda, then mps, then cpu
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by {world} processes")
    if args.small_crop_size is None:
        args.small_crop_size = data.small_crop_side(args.img_size, args.patch_size)
    for flag, size in (("--img-size", args.img_size), ("--small-crop-size", args.small_crop_size)):
        if size % args.patch_size:
            raise SystemExit(f"error: {flag} {size} is not a multiple of --patch-size {args.patch_size}")
    is_main = rank == 0
    if args.num_small_crops is None:
        args.num_small_crops = default_small_crops(args.small_crop_size, args.img_size, args.patch_size)
        if is_main and not args.num_small_crops:
            side = args.small_crop_size // args.patch_size
            why = (f"{side}x{side} patches of {args.patch_size} px" if side < 4 else
                   f"more than half of the {args.img_size} px global crop")
            print(f"note: no small crops: a {args.small_crop_size} px crop would be {why} "
                  f"(--num-small-crops sets them)")
    args.precision = eval_linear.resolve_precision(args.precision, device, announce=is_main)  # auto -> bf16 / fp16
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and args.precision == "fp16")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise SystemExit(f"error: {ckpt_path} exists: pass --resume to continue that run, or another --out")
    if is_main:
        print(json.dumps(vars(args)))
    torch.manual_seed(args.seed)  # the model's init; the data seeds itself from --seed (data.build_loader)

    # ---- data ----
    mean, std = data.MEAN_STD[args.dataset]
    train_split = "train+unlabeled" if args.dataset == "stl10" else "train"
    specs = data.multicrop_specs(args.img_size, n_global=2, n_local=args.num_small_crops,
                                 local_size=args.small_crop_size, strength=args.color_strength)  # §3.2
    train_set = data.build_dataset(args.dataset, args.data_dir, train_split, download=args.download)
    # the views made a batch at a time on the device, or per image by PIL in loader workers (--aug)
    loader = data.build_train_loader(train_set, specs, mean, std, args.batch_size // world, args.workers, device,
                                     seed=args.seed, aug=args.aug, announce=is_main)
    if len(loader) == 0:
        raise SystemExit(f"error: {len(train_set)} images make no full batch of {args.batch_size // world}")
    if args.knn_every:  # every process extracts its shard of the features (eval_linear.knn_eval)
        knn_train, knn_test = eval_linear.knn_monitor_loaders(args.dataset, args.data_dir, args.img_size, mean, std,
                                                              args.workers, args.val_fraction)

    # ---- model ----
    backbone = vit.ARCHS[args.arch](img_size=args.img_size, patch_size=args.patch_size,
                                    freeze_patch_embed=args.freeze_patch_embed)
    model = SwAV(backbone, args.hidden_dim, args.out_dim, args.num_prototypes).to(device)
    ddp_model = model
    if distributed:
        if device.type == "cuda":  # global BN: batch statistics over all devices, as the reference code
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (SyncBatchNorm is CUDA-only)
        device_ids = None if device.index is None else [device.index]
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    train_model = torch.compile(ddp_model) if args.compile else ddp_model
    # the queue, per process: its share of --queue, a multiple of the batch so that it shifts by whole batches
    # (the reference trims it the same way); created, empty, at --queue-start-epoch
    queue_len = args.queue - args.queue % args.batch_size
    if args.queue and queue_len != args.queue and is_main:
        print(f"note: --queue {args.queue} is not a multiple of --batch-size {args.batch_size}: using {queue_len}")
    queue = None

    # ---- optimizer and schedule ----
    lr = args.lr * args.batch_size / 256  # linear scaling rule (Goyal et al. 2017)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.999))

    def lr_schedule_for(epochs):
        total_steps, warmup_steps = epochs * len(loader), args.warmup_epochs * len(loader)
        if warmup_steps > total_steps // 2:  # a short run (a demo, a test) would otherwise barely leave warmup
            warmup_steps = total_steps // 4
        return lambda step: cosine_schedule(step, total_steps, warmup_steps, lr)

    lr_schedule = lr_schedule_for(args.epochs)
    if args.warmup_epochs * 2 > args.epochs and is_main:
        print(f"note: --warmup-epochs {args.warmup_epochs} is more than half of {args.epochs} epochs: "
              f"warming up for a quarter of the run instead")

    # ---- resume ----
    start_epoch = 0
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        ckpt = eval_linear.read_checkpoint(ckpt_path)  # one line, not a traceback, if it is truncated
        is_dict = isinstance(ckpt, dict)
        if not is_dict or ckpt.get("method") != "swav" or not {"args", "model", "optimizer", "state"} <= set(ckpt):
            what = f"method {ckpt.get('method')!r}, keys {sorted(ckpt)}" if is_dict else type(ckpt).__name__
            raise SystemExit(f"error: {ckpt_path} is not a swav checkpoint of this repo ({what})")
        # the run's recipe must be the same; what may change: length, machine, logging
        # (--aug: the same recipe, other random draws; precision: the GPU's)
        free = {"resume", "epochs", "workers", "device", "compile", "knn_every", "val_fraction", "download",
                "data_dir", "out", "aug", "precision"}
        changed = {k: (ckpt["args"].get(k), v) for k, v in vars(args).items()
                   if k not in free and ckpt["args"].get(k) != v}
        if changed:
            diff = ", ".join(f"--{k.replace('_', '-')} {old} (now {new})" for k, (old, new) in changed.items())
            raise SystemExit(f"error: --resume with other settings than {ckpt_path} was trained with: {diff}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["state"]["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["state"]["scaler"])
        elif scaler.is_enabled() and is_main:  # written on CPU or in bf16/fp32: there was no loss scale to save
            print("note: the checkpoint holds no fp16 loss scale (it was written without one): starting afresh")
        if ckpt["state"]["queue"] is not None:  # all processes' queues, (2, Q, out_dim): this process's share
            queue = ckpt["state"]["queue"].chunk(world, dim=1)[rank].to(device)
        start_epoch = ckpt["epoch"]
        if is_main:
            print(f"resumed {ckpt_path} after epoch {start_epoch}")
            old_epochs, step = ckpt["args"]["epochs"], start_epoch * len(loader)
            if start_epoch >= args.epochs:
                print(f"{ckpt_path} has finished its {start_epoch} epochs: nothing to train "
                      f"(a larger --epochs continues it)")
            elif old_epochs != args.epochs:  # the cosine now ends at the new length: the lr jumps, not bit-exact
                print(f"note: --epochs {args.epochs} instead of {old_epochs}: the schedule is "
                      f"{'stretched' if args.epochs > old_epochs else 'shortened'} to "
                      f"{args.epochs} epochs; the lr of step {step} goes from "
                      f"{lr_schedule_for(old_epochs)(step):.3g} to {lr_schedule(step):.3g}")

    # ---- train ----
    log_path = os.path.join(args.out, "log.jsonl")
    if start_epoch == 0:  # the untrained network's k-NN first: the baseline the later lines gain on
        knn = eval_linear.knn_eval(backbone, knn_train, knn_test, device) if args.knn_every else None
        if is_main:
            os.makedirs(args.out, exist_ok=True)
            with open(log_path, "w") as f:  # (replaces the log of a run that died in its first epoch)
                queries = f"val ({args.val_fraction:g} of train)" if args.val_fraction else "test"
                f.write(json.dumps({"epoch": 0, "knn_top1": knn, "knn_queries": queries}) + "\n")
            print(json.dumps({"epoch": 0, "knn_top1": knn, "knn_queries": queries}))  # the baseline, on screen too
    for epoch in range(start_epoch, args.epochs):
        if queue_len and epoch >= args.queue_start_epoch and queue is None:  # zeros: empty until it is full
            queue = torch.zeros(2, queue_len // world, args.out_dim, device=device)
        stats = train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, epoch, args, queue)
        knn = None
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            knn = eval_linear.knn_eval(backbone, knn_train, knn_test, device)  # every process takes part
        saved_queue = queue
        if queue is not None and distributed:  # every process's queue into the one checkpoint
            parts = [torch.empty_like(queue) for _ in range(world)]
            dist.all_gather(parts, queue)
            saved_queue = torch.cat(parts, dim=1)                                 # (2, Q, out_dim)
        if is_main:
            # no RNG state: the views are seeded by (seed, epoch, image), the order by (seed, epoch)
            save_checkpoint(ckpt_path, {
                "method": "swav", "epoch": epoch + 1, "args": vars(args), "vit_kwargs": backbone.kwargs,
                "backbone": backbone.state_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": {"step": (epoch + 1) * len(loader), "scaler": scaler.state_dict(),
                          "queue": None if saved_queue is None else saved_queue.cpu()},
            })
            log = {"epoch": epoch + 1, **stats, "knn_top1": knn}
            with open(log_path, "a") as f:  # after the checkpoint: no line twice
                f.write(json.dumps(log) + "\n")
            print(json.dumps({**log, **eval_linear.last_knn(log_path)}))  # on screen: the last k-NN measured
    if is_main:  # what the run gained, where it is, what next
        print(eval_linear.run_summary(log_path, ckpt_path, time.time() - started, start_epoch, args.epochs))
    if distributed:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    data.run_script(main, get_args_parser)  # one voice under torchrun; Ctrl-C: one line saying how to resume

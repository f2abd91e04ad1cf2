r"""MoCo v3: contrastive learning against a momentum encoder, with the ViT training recipe.

Paper: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021,
https://arxiv.org/abs/2104.02057. The optional queue: He et al., "Momentum Contrast for Unsupervised Visual
Representation Learning" (MoCo, https://arxiv.org/abs/1911.05722) and Chen et al., "Improved Baselines with
Momentum Contrastive Learning" (MoCo v2, https://arxiv.org/abs/2003.04297).

The method (Algorithm 1): two augmented views go through the base encoder f_q (ViT + projection MLP +
prediction MLP) to give queries q1, q2, and through the momentum encoder f_k (ViT + projection MLP, an
exponential moving average of f_q's, no gradient) to give keys k1, k2. Each query must find the key of its
own image among the keys of the batch: loss = ctr(q1, k2) + ctr(q2, k1), an InfoNCE over cosine similarities
/ tau. With `--queue K` the K most recent keys join as extra negatives, MoCo v2's memory for small batches.
Collapse (all embeddings equal) sits at loss 2 * 2 tau ln(G) (G keys, plus K with a queue); embed_std, the
per-dimension std of the L2-normalized CLS feature over the batch, is 0 at collapse, at most 1/sqrt(D).

Run:
    python moco.py --epochs 100      # one GPU, ViT-Tiny/4 on CIFAR-10 (downloaded into ./data the first time)
    python moco.py --dataset folder --data-dir tests/data_sample --arch vit_mini --patch-size 8 \
        --epochs 3 --warmup-epochs 1 --batch-size 128 --out runs/moco_demo   # offline CPU demo
    torchrun --nproc_per_node=4 moco.py --batch-size 1024 ...      # 4 GPUs; --batch-size is the total
    python eval_linear.py --ckpt runs/moco/checkpoint.pt            # k-NN + linear probe

Which network: the checkpoint's backbone is the base encoder's (f_q), the one the paper evaluates; the momentum
encoder is in "model" (eval_linear.py --checkpoint-key teacher). In a short run the momentum encoder lags: 4 epochs
on a 10,000-image CIFAR-10 subset (vit_mini/8, batch 256, these defaults), k-NN with 45,000 CIFAR-10 train images
as the bank and the 5,000 held out of it as queries (eval_linear.py --val-fraction 0.1): base encoder 34.50,
momentum encoder 31.66, untrained 30.10 (its momentum rises from 0.99 to 1 over those 156 steps).

Differences from the paper:
  - ViT (CLS token) on 32 px images instead of ViT-S/B at 224 px; batch 512 instead of 4096, 100 epochs
    instead of 300, 10 warmup epochs instead of 40; AdamW lr 5e-4 * batch / 256 instead of 1.5e-4 (see --lr).
  - No weight decay on biases, norms, the CLS token and the position embedding (DeiT's rule; DINO exempts
    biases and norms only; the reference's AdamW decays every parameter).
  - The ViT is initialized as timm/DINO's (every Linear trunc-normal std 0.02, CLS token trunc-normal 0.02),
    not as the reference's vits.py (Xavier-uniform Linear weights, q, k and v Xavier-uniform each on its own
    third of qkv, CLS token normal std 1e-6); the patch projection's Xavier-uniform init and the fixed sin-cos
    position embedding are the reference's (vits.py's vit_small has 12 heads, DeiT's and ours 6).
  - Both views go through the ViT in one batch (a ViT has no batch statistics, so this changes nothing);
    the MLPs see each view's batch separately, as in the reference code (their BN statistics are per view).
  - The momentum update follows the optimizer step (the reference runs it before the keys of the next
    step: the same weights). Global BN (SyncBatchNorm) only on CUDA.
  - --queue (off by default) is MoCo v2's memory on MoCo v3's heads, a combination no paper validates: the
    heads' BatchNorm gives each positive key this batch's statistics and the queued negatives other batches',
    so a query can tell its positive by the batch statistics it shares: the intra-batch leak that MoCo v1
    (§3.3) shuffles BN against. Nothing here shuffles.
  - No blur on 32 px images (BYOL's pair as CIFAR recipes use it, see data.byol_specs); bicubic resizing of
    the crops (BYOL's; the reference's transforms resize bilinearly).
  - Gradient clipping at a total norm of 3.0 (--clip-grad; 0: off); the reference does not clip. 3.0 is
    DINO's --clip_grad, which DINO applies to each parameter's gradient on its own (utils.clip_gradients), so
    the total-norm clip here is the stricter of the two. The loss has the reference's scale (x 2 tau). In the
    README's CPU protocol (seed 0, k-NN monitor on the 10,000-image subset, untrained 28.64) it made no
    difference: k-NN 31.76 with it, 31.60 without; kept as a bound on a rare bad step of a long run.
  - bf16 autocast on a GPU that has it (--precision auto; fp16 with a scaler on one that has not); the
    reference trains in fp16 with a gradient scaler.
"""
import argparse
import copy
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
def contrastive_loss(q, k, temperature, queue=None, rank=0):
    """MoCo v3's ctr(q, k): cross-entropy over q kᵀ / tau with the positives on the diagonal, times 2 tau.

    q: (B, D) queries of this process's B images; k: (G, D) keys of the global batch (all processes'
    images, gathered without gradient; G = B in one process), `rank` says where this process's images sit
    among them. queue: (K, D) normalized keys of earlier steps, extra negatives (MoCo v2), or None.
    Both q and k are L2-normalized here (Algorithm 1's normalize): the logits are cosines / tau. Query b's
    positive is row rank * B + b of k; the queue's keys are K more negative columns. Returns the mean over the
    B queries of the cross-entropy, times 2 tau (0-dim, fp32). At collapse: 2 tau ln(G + K).
    """
    B = q.shape[0]
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature                                                 # (B, G)
    if queue is not None:
        logits = torch.cat([logits, q @ queue.T / temperature], dim=1)            # (B, G + K)
    labels = torch.arange(B, device=q.device) + rank * B  # the key of the same image, other view
    # * 2 tau: the reference code's scale. d(loss)/d(cosine) carries 1 / tau; multiplying by tau keeps the
    # gradient's size the same for every temperature (one lr for all tau), and 2 is a constant on top
    return F.cross_entropy(logits, labels) * 2 * temperature


# ---- model ----
def mlp(num_layers, in_dim, hidden_dim, out_dim):
    """The reference `_build_mlp`: Linear (no bias) - BN - ReLU per hidden layer, the last Linear followed by
    a BN without affine parameters (SimCLR's final BN)."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        else:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class MoCo(nn.Module):
    def __init__(self, backbone, hidden_dim, out_dim):
        super().__init__()
        # base encoder f_q: backbone + 3-layer projector (§3, ViT: 4096 hidden, 256 out) + 2-layer predictor
        self.backbone = backbone
        self.projector = mlp(3, backbone.embed_dim, hidden_dim, out_dim)
        self.predictor = mlp(2, out_dim, hidden_dim, out_dim)
        # momentum encoder f_k: a copy of backbone + projector, trained only by the moving average
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x, num_views=2):                      # (V*B, C, H, W), the views one after the other
        """x: (V*B, C, H, W), the V = num_views views one after the other. Returns (h, q, k): h (V*B, D) the base
        backbone's CLS features; the queries q = predictor(projector(h)) of Algorithm 1's base encoder f_q; the keys
        k of the momentum encoder f_k (momentum_backbone, then momentum_projector; no predictor), under
        torch.no_grad. Each view's B samples go through the MLPs on their own (per-view BN, as the reference's
        one forward per view); the MLPs run in fp32 with autocast off."""
        h = self.backbone(x)                                # (V*B, D) CLS features, bf16 under autocast
        with torch.no_grad():
            h_k = self.momentum_backbone(x)                 # (V*B, D)
        with torch.autocast(x.device.type, enabled=False):  # BatchNorm statistics in fp32, per view
            q = torch.cat([self.predictor(self.projector(hv)) for hv in h.float().chunk(num_views)])
            with torch.no_grad():
                k = torch.cat([self.momentum_projector(hv) for hv in h_k.float().chunk(num_views)])
        return h, q, k                                      # (V*B, D), (V*B, out_dim), (V*B, out_dim)


# ---- helpers (written out in each method file on purpose: a diff between methods shows the papers' changes) ----
def cosine_schedule(step, total_steps, warmup_steps, base_value, final_value=0.0):
    """Linear warmup from 0 to base_value, then half a cosine down to final_value."""
    if step < warmup_steps:
        return base_value * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def ema_update(target, online, m):
    """target <- m * target + (1 - m) * online for every parameter, in place (Algorithm 1: f_k = m f_k + (1-m) f_q).

    target, online: modules of the same architecture (the target's parameters do not require gradients), m in
    [0, 1]. Buffers (BN's running statistics) stay the target's own; the update is no step autograd records. One
    multi-tensor op (torch._foreach_*) for all of them is the fast way: a few kernels for the ~160 tensors of a
    ViT-Tiny and its head instead of two per tensor, each a kernel launch of its own on a GPU."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)


def all_gather(t):
    """[t of every process], without gradient (the keys need none)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def param_groups(model, weight_decay):
    """AdamW's two groups: weight_decay on every trainable parameter of 2 or more dimensions, 0 on biases and
    norms (1-D) and on the CLS token and position embedding, DeiT's rule (timm's no_weight_decay). DINO's
    get_params_groups exempts only biases and norms (it decays the tokens); MoCo v3's AdamW decays everything.
    Parameters with requires_grad False (the momentum encoder) are in neither group."""
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
    p.add_argument("--img-size", type=data.pixel_side, default=32, help="training crop size (paper: 224)")
    p.add_argument("--freeze-patch-embed", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the random patch projection fixed, the paper's fix for ViT training instability "
                        "(§4.2; on by default, --no-freeze-patch-embed shows what it fixes)")
    p.add_argument("--epochs", type=data.epoch_count, default=100, help="paper: 300 (ViT, ImageNet)")
    p.add_argument("--batch-size", type=data.positive_int, default=512, help="total over all processes (paper: 4096)")
    p.add_argument("--lr", type=data.positive_float, default=5e-4,
                   help="AdamW lr per 256 images; the run uses lr * batch-size / 256 (paper: 1.5e-4 at batch "
                        "4096, 300 epochs; short small-batch runs train faster with more)")
    p.add_argument("--weight-decay", type=data.nonneg_float, default=0.1, help="AdamW decoupled decay (paper: 0.1)")
    p.add_argument("--warmup-epochs", type=data.nonneg_int, default=10, help="linear lr warmup (paper: 40 of 300)")
    p.add_argument("--workers", type=data.worker_count, default=4,
                   help="PIL loader processes per GPU (--aug pil, and the k-NN monitor's loaders)")
    p.add_argument("--aug", default="auto", choices=["auto", "batched", "pil"],
                   help="how the views are made, from the same recipe: batched (on the training device, a batch at a "
                        "time, from the training set decoded once into memory) or pil (per image, in --workers "
                        "loader processes); auto: batched where the decoded set fits in 2 GB (CIFAR: 150 MB) and its "
                        "images have one size, else pil")
    p.add_argument("--gpu-aug", dest="aug", action="store_const", const="batched", default=argparse.SUPPRESS,
                   help="old name of --aug batched")
    p.add_argument("--out", default="runs/moco", help="folder for checkpoint.pt and log.jsonl")
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
    # MoCo's own
    p.add_argument("--temperature", type=data.positive_float, default=0.2,
                   help="tau of the contrastive loss (paper, ViT: 0.2)")
    p.add_argument("--momentum", type=data.probability, default=0.99,
                   help="momentum m of the key encoder at the start, raised to 1 by a half cosine (paper, ViT: "
                        "0.99)")
    p.add_argument("--hidden-dim", type=data.width_int, default=4096,
                   help="projector and predictor width (paper: 4096)")
    p.add_argument("--out-dim", type=data.width_int, default=256, help="projection output (paper: 256)")
    p.add_argument("--queue", type=data.queue_size, default=0, metavar="K",
                   help="keep the K latest keys as extra negatives (MoCo v2's queue; v3: 0 = off). K must be a "
                        "multiple of --batch-size and at most the training set; MoCo v2: 65536 on ImageNet, "
                        "4096 on CIFAR-10")
    p.add_argument("--clip-grad", type=data.nonneg_float, default=3.0, help="max gradient norm (DINO's 3.0); 0: off")
    return p


def train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, momentum_schedule, queue, epoch,
                    args):
    """One epoch of MoCo v3's Algorithm 1, step by step. `model` is the MoCo module, `train_model` the same
    wrapped for the run (DistributedDataParallel, torch.compile) or itself; `queue` is None or
    {"keys": (K, out_dim) normalized keys, "ptr": where the next keys go}. Returns the epoch's averages."""
    device = next(model.parameters()).device
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    precision = eval_linear.resolve_precision(args.precision, device)  # main() resolved it already; tests may not
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    use_amp = device.type == "cuda" and amp_dtype is not None
    model.train()
    data.set_epoch(loader, epoch)  # this epoch's shuffle and augmentations (without it: the first one's again)
    t0, seen, loss_sum, std_sum = time.time(), 0, 0.0, 0.0
    grad_norms = []  # before clipping, one per step: how often --clip-grad acted
    bar = tqdm(loader, desc=f"moco {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True)
    for it, ((x1, x2), _) in enumerate(bar):
        # 1. schedules: the learning rate and the momentum of this global step
        step = epoch * len(loader) + it
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step)
        m = momentum_schedule(step)

        # 2. the two augmented views: queries from the base encoder, keys from the momentum encoder
        x = torch.cat([x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)])  # (2B, C, H, W)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            h, q, k = train_model(x)                                  # (2B, D), (2B, out_dim), (2B, out_dim)
        q1, q2 = q.chunk(2)                                           # (B, out_dim) each
        k1, k2 = k.chunk(2)
        if distributed:  # every process's keys are negatives; keys need no gradient, a plain all_gather does
            k1, k2 = [torch.cat(all_gather(t)) for t in (k1, k2)]    # (G, out_dim) each

        # 3. the symmetrized loss: each view's queries against the other view's keys (and the queue)
        keys = None if queue is None else queue["keys"]
        loss = (contrastive_loss(q1, k2, args.temperature, keys, rank) +
                contrastive_loss(q2, k1, args.temperature, keys, rank))

        # 4. backward, clip, step; a non-finite loss or gradient stops the run before it reaches a checkpoint
        # (loss, gradient norm and the collapse monitor come back to the CPU together: the step's one sync)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or float("inf"))
        embed_std = F.normalize(h.detach().float(), dim=1).std(dim=0).mean()  # the collapse monitor, see step 6
        loss_value, grad_value, std_value = torch.stack([loss.detach(), grad_norm.float(), embed_std]).tolist()
        # (an fp16 gradient scaler skips overflowing steps itself: there an inf gradient is routine)
        for name, value in (("loss", loss_value), ("gradient norm", None if scaler.is_enabled() else grad_value)):
            if value is not None and not math.isfinite(value):
                raise SystemExit(f"error: {name} is {value} at epoch {epoch + 1}, step {step}; stopping before "
                                 f"it reaches a checkpoint (try a lower --lr, or --precision fp32)")
        scaler.step(optimizer)
        scaler.update()

        # 5. momentum update of the key encoder, then the keys into the queue (first in, first out)
        ema_update(model.momentum_backbone, model.backbone, m)
        ema_update(model.momentum_projector, model.projector, m)
        if queue is not None:
            for k_view in (k1, k2):                                   # G keys at a time; G divides K
                G = k_view.shape[0]
                queue["keys"][queue["ptr"]:queue["ptr"] + G] = F.normalize(k_view.float(), dim=1)
                queue["ptr"] = (queue["ptr"] + G) % queue["keys"].shape[0]

        # 6. log: loss and the collapse monitor, the per-dimension std of the normalized CLS feature
        seen += x1.shape[0] * world
        loss_sum += loss_value
        grad_norms.append(grad_value)
        std_sum += std_value
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", m=f"{m:.4f}",
                        img_s=f"{seen / (time.time() - t0):.0f}")

    means = torch.tensor([loss_sum, std_sum], device=device) / len(loader)
    if distributed:  # each process saw its share of the global batch: average over processes
        dist.all_reduce(means)
        means /= world
    seconds = time.time() - t0
    finite = [g for g in grad_norms if math.isfinite(g)]  # (an fp16 step the scaler skipped has an inf norm)
    clip = {"grad_norm": sum(finite) / max(1, len(finite)), "grad_norm_max": max(finite, default=0.0),
            "clipped": sum(g > args.clip_grad for g in finite) / max(1, len(finite)) if args.clip_grad else 0.0}
    return {"loss": means[0].item(), "lr": optimizer.param_groups[0]["lr"], "momentum": m,
            "embed_std": means[1].item(), "img_per_s": seen / seconds, "seconds": seconds, **clip}


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
    if args.img_size % args.patch_size:
        raise SystemExit(f"error: --img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    is_main = rank == 0
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
    specs = data.byol_specs(args.img_size)  # BYOL's asymmetric pair (§4)
    train_set = data.build_dataset(args.dataset, args.data_dir, train_split, download=args.download)
    # the views made a batch at a time on the device, or per image by PIL in loader workers (--aug)
    loader = data.build_train_loader(train_set, specs, mean, std, args.batch_size // world, args.workers, device,
                                     seed=args.seed, aug=args.aug, announce=is_main)
    if len(loader) == 0:
        raise SystemExit(f"error: {len(train_set)} images make no full batch of {args.batch_size // world}")
    if args.queue and (args.queue % args.batch_size or args.queue > len(train_set)):
        raise SystemExit(f"error: --queue {args.queue} must be a multiple of --batch-size {args.batch_size} and at "
                         f"most the {len(train_set)} training images (an image's own key would be its negative)")
    if args.knn_every:  # every process extracts its shard of the features (eval_linear.knn_eval)
        knn_train, knn_test = eval_linear.knn_monitor_loaders(args.dataset, args.data_dir, args.img_size, mean, std,
                                                              args.workers, args.val_fraction)

    # ---- model ----
    backbone = vit.ARCHS[args.arch](img_size=args.img_size, patch_size=args.patch_size,
                                    freeze_patch_embed=args.freeze_patch_embed)
    model = MoCo(backbone, args.hidden_dim, args.out_dim).to(device)
    ddp_model = model
    if distributed:
        if device.type == "cuda":  # global BN: batch statistics over all devices, as the reference code
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (SyncBatchNorm is CUDA-only)
        device_ids = None if device.index is None else [device.index]
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    train_model = torch.compile(ddp_model) if args.compile else ddp_model
    queue = None
    if args.queue:  # random unit vectors until real keys arrive, as MoCo v1/v2
        queue = {"keys": F.normalize(torch.randn(args.queue, args.out_dim, device=device), dim=1), "ptr": 0}

    # ---- optimizer and schedules ----
    lr = args.lr * args.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as the paper
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.999))

    def schedules_for(epochs):
        total_steps, warmup_steps = epochs * len(loader), args.warmup_epochs * len(loader)
        if warmup_steps > total_steps // 2:  # a short run (a demo, a test) would otherwise barely leave warmup
            warmup_steps = total_steps // 4
        return (lambda step: cosine_schedule(step, total_steps, warmup_steps, lr),
                lambda step: cosine_schedule(step, total_steps, 0, args.momentum, 1.0))  # m: to 1 (§3)

    lr_schedule, momentum_schedule = schedules_for(args.epochs)
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
        if not is_dict or ckpt.get("method") != "moco" or not {"args", "model", "optimizer", "state"} <= set(ckpt):
            what = f"method {ckpt.get('method')!r}, keys {sorted(ckpt)}" if is_dict else type(ckpt).__name__
            raise SystemExit(f"error: {ckpt_path} is not a moco checkpoint of this repo ({what})")
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
        if queue is not None:
            queue = {"keys": ckpt["state"]["queue"]["keys"].to(device), "ptr": ckpt["state"]["queue"]["ptr"]}
        start_epoch = ckpt["epoch"]
        if is_main:
            print(f"resumed {ckpt_path} after epoch {start_epoch}")
            old_epochs, step = ckpt["args"]["epochs"], start_epoch * len(loader)
            if start_epoch >= args.epochs:
                print(f"{ckpt_path} has finished its {start_epoch} epochs: nothing to train "
                      f"(a larger --epochs continues it)")
            elif old_epochs != args.epochs:  # the cosines now end at the new length: lr and m jump, not bit-exact
                print(f"note: --epochs {args.epochs} instead of {old_epochs}: the schedules are "
                      f"{'stretched' if args.epochs > old_epochs else 'shortened'} to "
                      f"{args.epochs} epochs; the lr of step {step} goes from "
                      f"{schedules_for(old_epochs)[0](step):.3g} to {lr_schedule(step):.3g}")

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
        stats = train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, momentum_schedule,
                                queue, epoch, args)
        knn = None
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            knn = eval_linear.knn_eval(backbone, knn_train, knn_test, device)  # every process takes part
        if is_main:
            # no RNG state: the views are seeded by (seed, epoch, image), the order by (seed, epoch)
            save_checkpoint(ckpt_path, {
                "method": "moco", "epoch": epoch + 1, "args": vars(args), "vit_kwargs": backbone.kwargs,
                "backbone": backbone.state_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": {"step": (epoch + 1) * len(loader), "scaler": scaler.state_dict(), "queue": queue},
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

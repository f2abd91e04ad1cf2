r"""SimCLR: contrastive learning with in-batch negatives.

Paper: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, https://arxiv.org/abs/2002.05709

The method: two random augmentations of every image go through the same encoder (here a ViT, CLS token)
and a small MLP projection head. The NT-Xent loss (Algorithm 1) asks each of the 2B views to pick out its
partner among the other 2B-1 views of the batch: a (2B-1)-way softmax over cosine similarities / tau.
After pretraining the head is thrown away and the backbone's CLS feature is the representation.
Collapse (all embeddings equal) sits at loss ln(2B-1); the log's embed_std, the per-dimension std of the
L2-normalized CLS feature over the batch, is 0 at collapse and at most 1/sqrt(D) (0.072 for D = 192).

Run:
    python simclr.py --epochs 100      # one GPU, ViT-Tiny/4 on CIFAR-10 (downloaded into ./data the first time)
    python simclr.py --dataset folder --data-dir tests/data_sample --arch vit_mini --patch-size 8 \
        --epochs 3 --warmup-epochs 1 --batch-size 128 --out runs/simclr_demo   # offline CPU demo
    torchrun --nproc_per_node=4 simclr.py --batch-size 1024 ...    # 4 GPUs; --batch-size is the total
    python eval_linear.py --ckpt runs/simclr/checkpoint.pt          # k-NN + linear probe

Differences from the paper:
  - ViT (CLS token) on 32 px images instead of ResNet-50 at 224 px.
  - AdamW instead of LARS (LARS is unstable with ViTs, MoCo v3 §5), lr 5e-4 * batch / 256, cosine decay;
    weight decay 0.05 (DeiT/DINO's AdamW value) instead of 1e-6, and none on biases, norms, the CLS token and
    the position embedding (DeiT's rule; the reference's LARS exempts biases and BatchNorm).
  - Batch 512 on one GPU instead of 4096; temperature 0.5, the paper's best for CIFAR-10 (Appendix B.9),
    instead of 0.1 for ImageNet at batch 4096.
  - No Gaussian blur on 32 px images, colour strength 0.5 (the paper's CIFAR-10 recipe, Appendix B.9).
  - The head's hidden layer is 2048 wide (--hidden-dim), not the encoder's width: the reference code's
    projection_head (model_util.py) is as wide as its input, 2048 for ResNet-50, which would be 192 here.
    Two layers as in the paper (the code's current default, num_proj_layers 3, is SimCLRv2's).
  - The head's last BatchNorm has no affine parameters (the paper's code keeps a scale, drops the bias).
  - The loss is the mean over all 2B anchors, half the reference's loss_a + loss_b (objective.py: the sum of
    the two directions): the same optimum, and AdamW's steps do not depend on the loss scale; clipping does.
  - Gradient clipping at a total norm of 3.0 (--clip-grad; 0: off); the reference does not clip. 3.0 is
    DINO's --clip_grad, which DINO applies to each parameter's gradient on its own (utils.clip_gradients), so
    the total-norm clip here is the stricter of the two. In the README's CPU protocol (seed 0, k-NN monitor on
    the 10,000-image subset, untrained 28.64) it made no difference: k-NN 35.15 with it, 35.24 without; kept
    as a bound on a rare bad step of a long run, at no measured cost.
  - Global BN (SyncBatchNorm) only on CUDA: under torchrun on CPU each process normalizes its own batch.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.nn  # autograd-aware collectives: the all-gather that carries gradients
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval_linear
import vit


# ---- loss ----
def nt_xent_loss(z1, z2, temperature, z1_all=None, z2_all=None, rank=0):
    """NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR's Algorithm 1.

    z1, z2: (B, D) projections of the two views of this process's B images (normalized here).
    z1_all, z2_all: (G, D) the same for all processes' images (gathered with gradient), None in one process;
        the anchors are this process's 2B views, the candidates all 2G views, and `rank` says where this
        process's images sit in the gathered batch. Mean over anchors of -log p(partner | anchor).
    """
    if z1_all is None:
        z1_all, z2_all = z1, z2
    B, G = z1.shape[0], z1_all.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)                     # (2B, D)
    candidates = F.normalize(torch.cat([z1_all, z2_all]).float(), dim=1)          # (2G, D)
    logits = anchors @ candidates.T / temperature                                 # (2B, 2G)
    idx = torch.arange(B, device=z1.device) + rank * B   # this process's images in the gathered batch
    self_idx = torch.cat([idx, idx + G])                                          # (2B,) each anchor itself
    partner_idx = torch.cat([idx + G, idx])                                       # (2B,) its other view
    # an anchor is not its own negative: the paper's 1[k != i] in the denominator
    logits[torch.arange(2 * B, device=z1.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, partner_idx)


# ---- model ----
class SimCLR(nn.Module):
    def __init__(self, backbone, hidden_dim, out_dim):
        super().__init__()
        self.backbone = backbone
        # projection head g(h) of §2.1 as in the paper's code: Linear-BN-ReLU-Linear-BN, output 128
        self.head = nn.Sequential(
            nn.Linear(backbone.embed_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
        )

    def forward(self, x):                                   # (B, C, H, W)
        h = self.backbone(x)                                # (B, D) CLS feature, bf16 under autocast
        with torch.autocast(x.device.type, enabled=False):  # BatchNorm statistics in fp32
            z = self.head(h.float())                        # (B, out_dim)
        return h, z


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
    SimCLR's LARS exempts biases and BatchNorm. Parameters with requires_grad False are in neither group."""
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
    p.add_argument("--freeze-patch-embed", action="store_true",
                   help="keep the random patch projection fixed (MoCo v3 §4.2 stability trick)")
    p.add_argument("--epochs", type=data.epoch_count, default=100,
                   help="paper: 100-1000 (CIFAR-10 up to 1000, App. B.9)")
    p.add_argument("--batch-size", type=data.positive_int, default=512,
                   help="total over all processes (paper: 4096 on ImageNet, 256-4096 on CIFAR-10)")
    p.add_argument("--lr", type=data.positive_float, default=5e-4,
                   help="AdamW lr per 256 images; the run uses lr * batch-size / 256 (paper: LARS 0.3 * B/256)")
    p.add_argument("--weight-decay", type=data.nonneg_float, default=0.05,
                   help="AdamW decoupled decay (DeiT/DINO's 0.05; paper: 1e-6 with LARS)")
    p.add_argument("--warmup-epochs", type=data.nonneg_int, default=10, help="linear lr warmup (paper: 10)")
    p.add_argument("--workers", type=data.worker_count, default=4,
                   help="PIL loader processes per GPU (--aug pil, and the k-NN monitor's loaders)")
    p.add_argument("--aug", default="auto", choices=["auto", "batched", "pil"],
                   help="how the views are made, from the same recipe: batched (on the training device, a batch at a "
                        "time, from the training set decoded once into memory) or pil (per image, in --workers "
                        "loader processes); auto: batched where the decoded set fits in 2 GB (CIFAR: 150 MB) and its "
                        "images have one size, else pil")
    p.add_argument("--gpu-aug", dest="aug", action="store_const", const="batched", default=argparse.SUPPRESS,
                   help="old name of --aug batched")
    p.add_argument("--out", default="runs/simclr", help="folder for checkpoint.pt and log.jsonl")
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
    # SimCLR's own
    p.add_argument("--temperature", type=data.positive_float, default=0.5,
                   help="NT-Xent tau: 0.5 is the paper's best on CIFAR-10 (App. B.9); 0.1 for ImageNet, batch 4096")
    p.add_argument("--hidden-dim", type=data.width_int, default=2048,
                   help="projection head's hidden width (reference code: the encoder's width, 2048 for ResNet-50; "
                        "that rule would give 192 for ViT-Tiny)")
    p.add_argument("--out-dim", type=data.width_int, default=128, help="projection output (paper: 128)")
    p.add_argument("--color-strength", type=data.strength, default=0.5,
                   help="colour distortion strength s (paper: 1.0 on ImageNet, 0.5 on CIFAR-10)")
    p.add_argument("--clip-grad", type=data.nonneg_float, default=3.0, help="max gradient norm (DINO's 3.0); 0: off")
    return p


def train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, epoch, args):
    """One epoch of SimCLR's Algorithm 1, step by step. `model` is the SimCLR module, `train_model` the same
    wrapped for the run (DistributedDataParallel, torch.compile) or itself. Returns the epoch's averages."""
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
    bar = tqdm(loader, desc=f"simclr {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True)
    for it, ((x1, x2), _) in enumerate(bar):
        # 1. schedule: the learning rate of this global step
        step = epoch * len(loader) + it
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step)

        # 2. the two augmented views, in one forward so BN sees 2B samples as in the paper's code
        x = torch.cat([x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)])  # (2B, C, H, W)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            h, z = train_model(x)                                                 # (2B, D), (2B, out_dim)
        z1, z2 = z.chunk(2)                                                       # (B, out_dim) each

        # 3. NT-Xent: each view against every view of the global batch
        if distributed:  # every process's views become negatives; the gather carries the gradient back
            z1_all = torch.cat(torch.distributed.nn.all_gather(z1))              # (G, out_dim)
            z2_all = torch.cat(torch.distributed.nn.all_gather(z2))
            loss = nt_xent_loss(z1, z2, args.temperature, z1_all, z2_all, rank)
        else:
            loss = nt_xent_loss(z1, z2, args.temperature)

        # 4. backward, clip, step; a non-finite loss or gradient stops the run before it reaches a checkpoint
        # (loss, gradient norm and the collapse monitor come back to the CPU together: the step's one sync)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or float("inf"))
        embed_std = F.normalize(h.detach().float(), dim=1).std(dim=0).mean()  # the collapse monitor, see step 5
        loss_value, grad_value, std_value = torch.stack([loss.detach(), grad_norm.float(), embed_std]).tolist()
        # (an fp16 gradient scaler skips overflowing steps itself: there an inf gradient is routine)
        for name, value in (("loss", loss_value), ("gradient norm", None if scaler.is_enabled() else grad_value)):
            if value is not None and not math.isfinite(value):
                raise SystemExit(f"error: {name} is {value} at epoch {epoch + 1}, step {step}; stopping before "
                                 f"it reaches a checkpoint (try a lower --lr, or --precision fp32)")
        scaler.step(optimizer)
        scaler.update()

        # 5. log: loss and the collapse monitor, the per-dimension std of the normalized CLS feature (the
        # head's last BatchNorm forces unit variance on z, so z would look healthy even at collapse)
        seen += x1.shape[0] * world
        loss_sum += loss_value
        grad_norms.append(grad_value)
        std_sum += std_value
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{seen / (time.time() - t0):.0f}")

    means = torch.tensor([loss_sum, std_sum], device=device) / len(loader)
    if distributed:  # each process saw its share of the global batch: average over processes
        dist.all_reduce(means)
        means /= world
    seconds = time.time() - t0
    finite = [g for g in grad_norms if math.isfinite(g)]  # (an fp16 step the scaler skipped has an inf norm)
    clip = {"grad_norm": sum(finite) / max(1, len(finite)), "grad_norm_max": max(finite, default=0.0),
            "clipped": sum(g > args.clip_grad for g in finite) / max(1, len(finite)) if args.clip_grad else 0.0}
    return {"loss": means[0].item(), "lr": optimizer.param_groups[0]["lr"], "embed_std": means[1].item(),
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
    specs = [data.simclr_spec(args.img_size, strength=args.color_strength)] * 2  # two draws of one recipe
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
    model = SimCLR(backbone, args.hidden_dim, args.out_dim).to(device)
    ddp_model = model
    if distributed:
        if device.type == "cuda":  # the paper's global BN: batch statistics over all devices (§2.3)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (SyncBatchNorm is CUDA-only)
        device_ids = None if device.index is None else [device.index]
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    train_model = torch.compile(ddp_model) if args.compile else ddp_model

    # ---- optimizer and schedule ----
    lr = args.lr * args.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as the paper
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
        if not is_dict or ckpt.get("method") != "simclr" or not {"args", "model", "optimizer", "state"} <= set(ckpt):
            what = f"method {ckpt.get('method')!r}, keys {sorted(ckpt)}" if is_dict else type(ckpt).__name__
            raise SystemExit(f"error: {ckpt_path} is not a simclr checkpoint of this repo ({what})")
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
        stats = train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, epoch, args)
        knn = None
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            knn = eval_linear.knn_eval(backbone, knn_train, knn_test, device)  # every process takes part
        if is_main:
            # no RNG state: the views are seeded by (seed, epoch, image), the order by (seed, epoch)
            save_checkpoint(ckpt_path, {
                "method": "simclr", "epoch": epoch + 1, "args": vars(args), "vit_kwargs": backbone.kwargs,
                "backbone": backbone.state_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": {"step": (epoch + 1) * len(loader), "scaler": scaler.state_dict()},
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

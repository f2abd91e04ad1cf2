"""Training speed of each method against the same method assembled from the lightly library, in one run, and
of our two data paths against each other.

For SimCLR, MoCo v3, BYOL, SwAV and DINO: images per second of our training step (the method file's own
train_one_epoch, with the model, optimizer, schedules and loader built as its main() builds them) against a
step made of lightly's pieces: its view transforms, projection / prediction heads, loss, momentum update and,
for SwAV, its prototypes and Sinkhorn (inside SwaVLoss), for DINO its DINOProjectionHead, DINOLoss (centre and
temperatures inside) and DINOTransform, on timm's VisionTransformer of the same shape. Both
sides get the same images (an evenly spaced subset of the train split), the same head widths, crops, batch,
AdamW, gradient clipping and precision (fp32 on CPU; on CUDA the backbone under bf16 autocast, heads and losses
in fp32, as our scripts do), and each side its default data path: ours the method file's (--aug auto: the
batched path wherever the training set fits in memory, as CIFAR's does), lightly's its transforms on PIL images
in --workers DataLoader workers. Side "ours-pil" is ours with --aug pil (PIL in the same number of workers):
`--sides ours,ours-pil` compares our two paths, end to end, without lightly.
The sides alternate per method and round (who goes first rotates); a side's figure is the median over rounds,
a ratio x/y > 1 means x is faster; the ratios of the rounds (runs adjacent in time) are printed with their median.
A run times --steps steps after --warmup steps; a step's time runs from the arrival of its batch to the
arrival of the next, so it holds the wait for data (or the making of a batch's views, on the batched path) as
well as the compute. With --cached each run's batches are made before its clock starts: the ratio is then of
the training steps alone, with no loader worker taking CPU time from them.

    python -m venv --system-site-packages /tmp/lightly-venv && /tmp/lightly-venv/bin/pip install lightly
    /tmp/lightly-venv/bin/python benchmarks/method_speed.py --workers 2 --rounds 3   # CPU, vit_mini/8, batch 128
    python benchmarks/method_speed.py --sides ours,ours-pil --workers 2 --rounds 3   # our two paths (no lightly)
    /tmp/lightly-venv/bin/python benchmarks/method_speed.py --cached --rounds 5        # the steps alone
    /tmp/lightly-venv/bin/python benchmarks/method_speed.py --methods swav --profile   # where the time goes
    /tmp/lightly-venv/bin/python benchmarks/method_speed.py --device cuda --arch vit_tiny --batch-size 512
    /tmp/lightly-venv/bin/python benchmarks/method_speed.py --dataset folder --data-dir <ImageFolder tree>

The images: CIFAR-10 by default (torchvision's copy, downloaded into --data-dir when missing), or any dataset
of data.build_dataset (--dataset cifar100 | stl10 | folder); both sides read it through data.build_dataset.

lightly is a benchmark-only extra, installed apart (it pulls in pytorch-lightning): never a dependency of
training, of the tests or of requirements*.txt.

What is the same on both sides: backbone shape (timm's ViT with our preset's width, depth, heads and patch),
the views of every backbone call batched the way our method file batches them (both views in one call; SwAV
one call per crop size), heads called per view where ours are (MoCo's and BYOL's, so the BatchNorm statistics
are per view), the head widths and layer counts of our defaults, the transforms' parameters (crop scales,
colour strength, grayscale, solarization, no blur at 32 px, 2 x 32 + 6 x 16 px crops for SwAV, 2 x 32 + 8 x 16
px for DINO), MoCo's and BYOL's momentum networks (ViT + projector, both views), DINO's teacher (ViT + head,
the global crops), SwAV's prototypes frozen for the first iterations.

What differs and could not be made equal (read the ratio with these in mind):
  - backbone: ours is vit.py (fixed sin-cos position embedding, not trained), lightly's side timm's (learned
    position embedding; for SwAV dynamic_img_size resamples it for the 16 px crops every step). The
    backbones alone are compared by benchmarks/vit_speed.py.
  - transforms: lightly's crop is bilinear where SimCLR's and BYOL's recipes (ours) are bicubic; lightly adds
    vertical flip and rotation steps at probability 0 and draws its blur / solarization coins from numpy
    even at probability 0. Our loaders seed every image's draws (data.SeededViews, data.uniforms); lightly's
    side is a plain shuffled DataLoader. Our batched path resizes a crop by one bilinear grid_sample (no
    antialiasing) and makes the views in the training process, between steps.
  - noise: the runs of a method alternate, but a run lasts seconds; on a shared machine the load changes
    between runs. Read the per-round lines printed above the table and use more --rounds where it matters.
  - heads: lightly's last BatchNorm of SimCLR's and MoCo's heads is affine (ours is not), its BYOL heads'
    first Linear has no bias (ours has), its SwAV prototypes have a bias (ours have none). MoCo v3's
    predictor is lightly's MoCoProjectionHead with 2 layers (lightly has no MoCo v3 predictor class).
  - losses: MoCo v3 on lightly's side is NTXentLoss(q, k) at tau 0.2, which also scores q against q and k
    against k (a (2B, 2B) problem where MoCo v3's ctr is (B, B)). BYOL uses NegativeCosineSimilarity.
    SwAV: SwaVLoss runs Sinkhorn per global crop inside the loss, ours before it; neither side has a queue
    (ours starts it at epoch 15). DINO: lightly's last layer is not frozen in the measured epoch (ours is, as
    --freeze-last-layer 1: its gradient is dropped), and the teacher's centre is updated inside DINOLoss.
  - step: ours also computes the collapse monitor (embed_std; SwAV's prototype use and code entropy; DINO's
    teacher entropy and KL), checks the loss and gradient norm for NaN, sets the lr (DINO: and the weight
    decay) of every step and updates a tqdm bar; lightly's side reads
    loss.item() once per step and keeps a constant lr. Weight decay groups: ours by param_groups, lightly's
    by get_weight_decay_parameters (the same split up to the tokens).
It does not measure accuracy, distributed runs or torch.compile.
"""
import argparse
import contextlib
import copy
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import byol  # noqa: E402
import data  # noqa: E402
import dino  # noqa: E402
import moco  # noqa: E402
import simclr  # noqa: E402
import swav  # noqa: E402
import vit  # noqa: E402

MODULES = {"simclr": simclr, "moco": moco, "byol": byol, "swav": swav, "dino": dino}
DEFAULT_PATCH = {"vit_mini": 8, "vit_tiny": 4}
INSTALL = ("pip install lightly in a separate environment: python -m venv --system-site-packages "
           "/tmp/lightly-venv && /tmp/lightly-venv/bin/pip install lightly, then run this script with "
           "/tmp/lightly-venv/bin/python")


def import_lightly():
    """lightly's pieces and timm's ViT, or a one-line error saying how to get them."""
    try:
        import lightly
        from lightly import loss
        from lightly.models import utils
        from lightly.models.modules import heads
        from lightly import transforms
        from lightly.utils.scheduler import cosine_schedule
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise SystemExit(f"error: {e}: {INSTALL}") from None
    return SimpleNamespace(version=lightly.__version__, loss=loss, utils=utils, heads=heads,
                           transforms=transforms, cosine_schedule=cosine_schedule, TimmViT=VisionTransformer)


# ---- timing ----

class Clocked:
    """A loader that notes when each batch arrives; everything else (len, dataset, sampler: what train_one_epoch
    and data.set_epoch use) is the wrapped loader's. cached: its batches are made before the clock starts and
    replayed, so the steps never wait for data and no worker competes with them for the CPU."""

    def __init__(self, loader, cached=False, device=None):
        self.loader, self.stamps, self.device = loader, [], device
        self.batches = list(loader) if cached else None
        self.memory_at_start = None

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        if self.device is not None:
            self.memory_at_start = reset_peak_memory(self.device)
        for batch in self.loader if self.batches is None else self.batches:
            self.stamps.append(time.perf_counter())
            yield batch


def reset_peak_memory(device):
    """Memory in use now (bytes), and the peak counter restarted from it. CUDA: the caching allocator's
    allocated bytes; CPU: the process's resident set, the kernel's high-water mark reset (Linux only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size to the current one
    return _proc_status("VmRSS")


def peak_memory(device):
    """The peak since reset_peak_memory (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def _proc_status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))  # kB


def images_per_second(clocked, warmup, steps, batch_size):
    """Steps warmup .. warmup+steps-1, each from its batch's arrival to the next's (the loader holds one more)."""
    return steps * batch_size / (clocked.stamps[warmup + steps] - clocked.stamps[warmup])


def subset(dataset, n):
    """n images evenly spaced over the dataset (an ImageFolder is sorted by class: this takes every class)."""
    if n > len(dataset):
        raise SystemExit(f"error: a run needs {n} images, the train split has {len(dataset)}: lower --batch-size "
                         f"or --steps")
    return Subset(dataset, range(0, len(dataset), len(dataset) // n)[:n])


# ---- ours: the method file's own step ----

PAPER_SMALL_CROPS = {"swav": 6, "dino": 8}  # what the files use where a small crop is at least 4x4 patches


def ours_args(method, a):
    """The method's args as its command line would give them: its defaults, our size, data and loader; SwAV and
    DINO with their papers' small crops at half the side (--small-crops), whatever the patch grid."""
    multicrop = [] if method not in PAPER_SMALL_CROPS else [
        "--small-crop-size", str(a.img_size // 2),
        "--num-small-crops", str(PAPER_SMALL_CROPS[method] if a.small_crops is None else a.small_crops)]
    return MODULES[method].get_args_parser().parse_args([
        "--dataset", a.dataset, "--data-dir", a.data_dir, "--arch", a.arch, "--patch-size", str(a.patch_size),
        "--img-size", str(a.img_size), *multicrop,
        "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--device", a.device,
        "--precision", "bf16" if a.device.startswith("cuda") else "fp32", "--knn-every", "0"])


def ours_specs(method, args):
    """The views each main() asks data.build_train_loader for."""
    if method == "simclr":
        return [data.simclr_spec(args.img_size, strength=args.color_strength)] * 2
    if method in ("moco", "byol"):
        return list(data.byol_specs(args.img_size))
    if method == "swav":
        return data.multicrop_specs(args.img_size, n_global=2, n_local=args.num_small_crops,
                                    local_size=args.small_crop_size, strength=args.color_strength)
    return data.dino_specs(args.img_size, n_local=args.num_small_crops, local_size=args.small_crop_size)


def ours_model(method, args):
    """The model each main() builds (one process: no DDP, no torch.compile)."""
    torch.manual_seed(args.seed)
    backbone = vit.ARCHS[args.arch](img_size=args.img_size, patch_size=args.patch_size,
                                    freeze_patch_embed=args.freeze_patch_embed)
    if method == "simclr":
        return simclr.SimCLR(backbone, args.hidden_dim, args.out_dim)
    if method == "moco":
        return moco.MoCo(backbone, args.hidden_dim, args.out_dim)
    if method == "byol":
        return byol.BYOL(backbone, args.hidden_dim, args.out_dim)
    if method == "swav":
        return swav.SwAV(backbone, args.hidden_dim, args.out_dim, args.num_prototypes)
    return dino.DINO(backbone, args.hidden_dim, args.bottleneck_dim, args.out_dim)


def run_ours(method, a, stats=None, aug="auto"):
    """One epoch of the method's train_one_epoch over warmup + steps + 1 batches; images per second. aug: the
    data path, as the method file's --aug (auto: its default). stats (a dict): gets "step_memory", the peak
    memory of the epoch above the memory in use at its start."""
    module, args = MODULES[method], ours_args(method, a)
    device = torch.device(a.device)
    mean, std = data.MEAN_STD[args.dataset]
    train_set = data.build_dataset(args.dataset, args.data_dir, "train", download=True)
    n_batches = a.warmup + a.steps + 1
    loader = Clocked(data.build_train_loader(subset(train_set, n_batches * a.batch_size), ours_specs(method, args),
                                             mean, std, args.batch_size, args.workers, device, seed=args.seed,
                                             aug=aug),
                     cached=a.cached, device=device if stats is not None else None)
    model = ours_model(method, args).to(device)
    lr = args.lr * args.batch_size / 256  # as main(): the linear scaling rule
    optimizer = torch.optim.AdamW(module.param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and args.precision == "fp16")
    total_steps = args.epochs * len(loader)
    warmup_steps = min(args.warmup_epochs * len(loader), total_steps // 4)  # main()'s short-run rule
    lr_schedule = lambda step: module.cosine_schedule(step, total_steps, warmup_steps, lr)  # noqa: E731
    momentum_schedule = lambda step: module.cosine_schedule(step, total_steps, 0, args.momentum, 1.0)  # noqa: E731
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the tqdm bar
        if method == "simclr":
            simclr.train_one_epoch(model, model, loader, optimizer, scaler, lr_schedule, 0, args)
        elif method == "moco":  # --queue 0 by default: MoCo v3 without a queue
            moco.train_one_epoch(model, model, loader, optimizer, scaler, lr_schedule, momentum_schedule, None, 0,
                                 args)
        elif method == "byol":
            byol.train_one_epoch(model, model, loader, optimizer, scaler, lr_schedule, momentum_schedule, 0, args)
        elif method == "swav":  # the queue starts at --queue-start-epoch (15): none in epoch 0
            swav.train_one_epoch(model, model, loader, optimizer, scaler, lr_schedule, 0, args, queue=None)
        else:  # weight decay to --weight-decay-end and the teacher temperature's warmup, as main()
            wd_schedule = lambda step: dino.cosine_schedule(step, total_steps, 0, args.weight_decay,  # noqa: E731
                                                            args.weight_decay_end)
            temp_schedule = lambda step: dino.linear_warmup(step, total_steps // 4, args.warmup_teacher_temp,  # noqa
                                                            args.teacher_temp)
            dino.train_one_epoch(model, model, loader, optimizer, scaler, lr_schedule, wd_schedule, momentum_schedule,
                                 temp_schedule, 0, args, torch.zeros(args.out_dim, device=device))
    if stats is not None:
        stats["step_memory"] = peak_memory(device) - loader.memory_at_start
    return images_per_second(loader, a.warmup, a.steps, a.batch_size)


# ---- lightly: the same method from lightly's pieces on timm's ViT ----

def timm_backbone(L, args, dynamic):
    """timm's ViT with our preset's shape; CLS token after the final norm, no classifier (as vit.py's)."""
    size = vit.PRESETS[args.arch]
    backbone = L.TimmViT(img_size=args.img_size, patch_size=args.patch_size, num_classes=0,
                         dynamic_img_size=dynamic, **size)
    if args.freeze_patch_embed:  # MoCo's default (v3 §4.2): the same trainable set as ours
        backbone.patch_embed.requires_grad_(False)
    return backbone


def lightly_transform(method, args, L):
    """lightly's view transforms with our recipes' parameters and our normalization of the dataset."""
    T = L.transforms
    mean, std = data.MEAN_STD[args.dataset]
    norm = {"mean": list(mean), "std": list(std)}
    if method == "simclr":
        return T.SimCLRTransform(input_size=args.img_size, cj_strength=args.color_strength, min_scale=0.08,
                                 gaussian_blur=0.0, normalize=norm)
    if method in ("moco", "byol"):  # BYOL's asymmetric pair, without blur at 32 px (data.byol_specs)
        return T.BYOLTransform(T.BYOLView1Transform(input_size=args.img_size, gaussian_blur=0.0, normalize=norm),
                               T.BYOLView2Transform(input_size=args.img_size, gaussian_blur=0.0, normalize=norm))
    if method == "dino":  # its own defaults are main_dino.py's: jitter 0.4/0.4/0.2/0.1, solarization 0.2
        return T.DINOTransform(global_crop_size=args.img_size, local_crop_size=args.small_crop_size,
                               n_local_views=args.num_small_crops, gaussian_blur=(0.0, 0.0, 0.0), normalize=norm)
    return T.SwaVTransform(crop_sizes=(args.img_size, args.small_crop_size), crop_counts=(2, args.num_small_crops),
                           crop_min_scales=(0.14, 0.05), crop_max_scales=(1.0, 0.14),
                           cj_strength=args.color_strength, gaussian_blur=0.0, normalize=norm)


class LightlyMethod(nn.Module):
    """Shared: the backbone under autocast on CUDA (heads and losses in fp32, as ours), no-op hooks."""

    def __init__(self, backbone, amp):
        super().__init__()
        self.backbone, self.amp = backbone, amp

    def features(self, backbone, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return backbone(x).float()                                    # (N, D)

    def trainable(self):
        return [self.backbone]

    def after_step(self, step):
        pass


class LightlySimCLR(LightlyMethod):
    def __init__(self, backbone, args, L, amp):
        super().__init__(backbone, amp)
        D = backbone.embed_dim
        self.head = L.heads.SimCLRProjectionHead(D, args.hidden_dim, args.out_dim, num_layers=2, batch_norm=True)
        self.criterion = L.loss.NTXentLoss(temperature=args.temperature)

    def trainable(self):
        return [self.backbone, self.head]

    def forward(self, views, step):
        z0, z1 = self.head(self.features(self.backbone, torch.cat(views))).chunk(2)  # (B, out_dim) each
        return self.criterion(z0, z1)


class LightlyMomentum(LightlyMethod):
    """MoCo v3 and BYOL: online backbone + projector + predictor, a momentum copy of backbone + projector."""

    def __init__(self, backbone, projector, predictor, criterion, momentum, total_steps, L, amp):
        super().__init__(backbone, amp)
        self.projector, self.predictor, self.criterion, self.L = projector, predictor, criterion, L
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(projector)
        L.utils.deactivate_requires_grad(self.momentum_backbone)
        L.utils.deactivate_requires_grad(self.momentum_projector)
        self.momentum, self.total_steps = momentum, total_steps

    def trainable(self):
        return [self.backbone, self.projector, self.predictor]

    def forward(self, views, step):
        x = torch.cat(views)                                              # (2B, C, H, W)
        p = [self.predictor(self.projector(h)) for h in self.features(self.backbone, x).chunk(2)]
        with torch.no_grad():
            z = [self.momentum_projector(h) for h in self.features(self.momentum_backbone, x).chunk(2)]
        return self.criterion(p[0], z[1]) + self.criterion(p[1], z[0])

    def after_step(self, step):
        m = self.L.cosine_schedule(step, self.total_steps, self.momentum, 1.0)
        self.L.utils.update_momentum(self.backbone, self.momentum_backbone, m)
        self.L.utils.update_momentum(self.projector, self.momentum_projector, m)


class LightlySwAV(LightlyMethod):
    def __init__(self, backbone, args, L, amp, steps_per_epoch):
        super().__init__(backbone, amp)
        D = backbone.embed_dim
        self.head = L.heads.SwaVProjectionHead(D, args.hidden_dim, args.out_dim)
        # frozen as ours: --freeze-prototypes-epochs in steps (the whole measured epoch, on both sides)
        frozen_steps = args.freeze_prototypes_epochs * steps_per_epoch
        self.prototypes = L.heads.SwaVPrototypes(args.out_dim, args.num_prototypes,
                                                 n_steps_frozen_prototypes=frozen_steps)
        self.criterion = L.loss.SwaVLoss(temperature=args.temperature, sinkhorn_iterations=args.sinkhorn_iterations,
                                         sinkhorn_epsilon=args.epsilon)

    def trainable(self):
        return [self.backbone, self.head, self.prototypes]

    def forward(self, crops, step):
        self.prototypes.normalize()
        # one backbone call per crop size, as ours (a ViT batch has one sequence length)
        groups = [list(g) for _, g in itertools.groupby(crops, key=lambda x: x.shape[-1])]
        h = torch.cat([self.features(self.backbone, torch.cat(g)) for g in groups])  # (V*B, D)
        z = F.normalize(self.head(h), dim=1)                                          # (V*B, out_dim)
        scores = list(self.prototypes(z, step).chunk(len(crops)))                    # V x (B, K)
        return self.criterion(scores[:2], scores[2:])


class LightlyDINO(LightlyMethod):
    """Student backbone + DINOProjectionHead, an EMA teacher of both that sees the 2 global crops, DINOLoss."""

    def __init__(self, backbone, args, L, amp, total_steps):
        super().__init__(backbone, amp)
        make_head = lambda: L.heads.DINOProjectionHead(  # noqa: E731
            backbone.embed_dim, args.hidden_dim, args.bottleneck_dim, args.out_dim)
        self.head, self.teacher_head = make_head(), make_head()  # (its weight_norm cannot be deep-copied)
        self.teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_backbone = copy.deepcopy(backbone)
        L.utils.deactivate_requires_grad(self.teacher_backbone)
        L.utils.deactivate_requires_grad(self.teacher_head)
        self.criterion = L.loss.DINOLoss(output_dim=args.out_dim, warmup_teacher_temp=args.warmup_teacher_temp,
                                         teacher_temp=args.teacher_temp, student_temp=args.student_temp,
                                         center_momentum=args.center_momentum)
        self.momentum, self.total_steps, self.L = args.momentum, total_steps, L

    def trainable(self):
        return [self.backbone, self.head]

    def forward(self, crops, step):
        groups = [list(g) for _, g in itertools.groupby(crops, key=lambda x: x.shape[-1])]  # one call per size
        student = self.head(torch.cat([self.features(self.backbone, torch.cat(g)) for g in groups]))
        with torch.no_grad():
            teacher = self.teacher_head(self.features(self.teacher_backbone, torch.cat(crops[:2])))
        return self.criterion(list(teacher.chunk(2)), list(student.chunk(len(crops))), epoch=0)

    def after_step(self, step):
        m = self.L.cosine_schedule(step, self.total_steps, self.momentum, 1.0)
        self.L.utils.update_momentum(self.backbone, self.teacher_backbone, m)
        self.L.utils.update_momentum(self.head, self.teacher_head, m)


def lightly_model(method, args, L, total_steps, amp):
    backbone = timm_backbone(L, args, dynamic=method in ("swav", "dino"))
    D, H = backbone.embed_dim, L.heads
    if method == "simclr":
        return LightlySimCLR(backbone, args, L, amp)
    if method == "moco":  # MoCo v3: 3-layer projector, 2-layer predictor, BN everywhere (§3)
        return LightlyMomentum(
            backbone, H.MoCoProjectionHead(D, args.hidden_dim, args.out_dim, num_layers=3, batch_norm=True),
            H.MoCoProjectionHead(args.out_dim, args.hidden_dim, args.out_dim, num_layers=2, batch_norm=True),
            L.loss.NTXentLoss(temperature=args.temperature), args.momentum, total_steps, L, amp)
    if method == "byol":
        return LightlyMomentum(
            backbone, H.BYOLProjectionHead(D, args.hidden_dim, args.out_dim),
            H.BYOLPredictionHead(args.out_dim, args.hidden_dim, args.out_dim),
            L.loss.NegativeCosineSimilarity(), args.momentum, total_steps, L, amp)
    if method == "swav":
        return LightlySwAV(backbone, args, L, amp, steps_per_epoch=total_steps // args.epochs)
    return LightlyDINO(backbone, args, L, amp, total_steps)


def run_lightly(method, a, L):
    """The lightly-assembled step over warmup + steps + 1 batches of the same images; images per second."""
    args = ours_args(method, a)  # only for the hyperparameters: the same widths, temperatures, momentum
    device = torch.device(a.device)
    # PIL images into lightly's transform, from a folder as from torchvision's CIFAR (as ours get them)
    train_set = data.build_dataset(a.dataset, a.data_dir, "train", lightly_transform(method, args, L), download=True)
    n_batches = a.warmup + a.steps + 1
    loader = Clocked(DataLoader(subset(train_set, n_batches * a.batch_size), batch_size=a.batch_size, shuffle=True,
                                num_workers=a.workers, pin_memory=device.type == "cuda", drop_last=True),
                     cached=a.cached)
    torch.manual_seed(args.seed)
    model = lightly_model(method, args, L, args.epochs * n_batches, amp=device.type == "cuda").to(device)
    decay, no_decay = L.utils.get_weight_decay_parameters(model.trainable())
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr * args.batch_size / 256, betas=(0.9, 0.999))
    model.train()
    for step, (views, _) in enumerate(loader):
        views = [v.to(device, non_blocking=True) for v in views]
        loss = model(views, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        model.after_step(step)
        loss.item()  # the step's sync, as a training loop's logging has it
    return images_per_second(loader, a.warmup, a.steps, a.batch_size)


# ---- report ----

def hardware(device):
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    line = f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        line += f", {torch.cuda.get_device_name()}"
    return line


def profile(method, a, L):
    """Each side's run under torch.profiler: the ops of the main process by self CPU time (workers not seen)."""
    for side, run in (("ours", lambda: run_ours(method, a)), ("lightly", lambda: run_lightly(method, a, L))):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        print(f"\n## {method}, {side}: {a.warmup + a.steps + 1} steps, top ops by self CPU time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="simclr,moco,byol,swav,dino", help="comma-separated")
    p.add_argument("--arch", default="vit_mini", choices=sorted(DEFAULT_PATCH))
    p.add_argument("--patch-size", type=int, default=None, help="default: 8 for vit_mini, 4 for vit_tiny")
    p.add_argument("--img-size", type=int, default=32, help="crop size (SwAV's small crops: half of it)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--small-crops", type=int, default=None,
                   help="SwAV's and DINO's small crops per image (default: the papers' 6 and 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes, both sides")
    p.add_argument("--rounds", type=int, default=2, help="runs per side and method, alternating")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder"],
                   help="torchvision's (downloaded into --data-dir when missing) or an ImageFolder tree (folder); "
                   "default: %(default)s")
    p.add_argument("--data-dir", default="data",
                   help="where the dataset is, or goes (its train split is used); default: %(default)s")
    p.add_argument("--cached", action="store_true",
                   help="make each run's batches before timing it: the training step alone, without the data path")
    p.add_argument("--sides", default="ours,lightly",
                   help="comma-separated, from: ours (the method file with its default data path, --aug auto), "
                        "ours-pil (the same with --aug pil: PIL in loader workers), lightly; default: %(default)s")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the training process (default: torch's, one per core)")
    p.add_argument("--profile", action="store_true", help="one profiled run per side instead of the benchmark")
    a = p.parse_args(argv)
    a.patch_size = a.patch_size or DEFAULT_PATCH[a.arch]
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in MODULES]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}: choose from {', '.join(MODULES)}")
    sides = [x.strip() for x in a.sides.split(",") if x.strip()]
    if not sides or set(sides) - {"ours", "ours-pil", "lightly"}:
        raise SystemExit(f"error: --sides {a.sides!r}: choose from ours, ours-pil, lightly")
    L = import_lightly() if "lightly" in sides or a.profile else None
    if a.profile:
        for method in methods:
            profile(method, a, L)
        return

    rates = {m: {side: [] for side in sides} for m in methods}
    for r in range(a.rounds):
        for method in methods:
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # who goes first rotates
                rate = (run_lightly(method, a, L) if side == "lightly" else
                        run_ours(method, a, aug="pil" if side == "ours-pil" else "auto"))
                rates[method][side].append(rate)
                print(f"round {r + 1}/{a.rounds} {method:6s} {side:8s} {rate:7.1f} img/s", flush=True)

    print(f"\n{a.arch}/{a.patch_size} at {a.img_size} px, batch {a.batch_size}, {a.workers} loader worker(s), "
          f"{a.steps} timed steps after {a.warmup}, median of {a.rounds} round(s), {a.device} "
          f"{'(batches cached before timing: the step alone) ' if a.cached else ''}"
          f"({'bf16 autocast' if a.device.startswith('cuda') else 'fp32'})"
          f"{f'; lightly {L.version}' if L else ''}; ours: the method file's default data path (--aug auto: "
          f"batched here), ours-pil: --aug pil\n")
    pairs = [(x, y) for i, x in enumerate(sides) for y in sides[i + 1:]]
    print("| method | " + " | ".join(f"{side} img/s" for side in sides) + " | " +
          " | ".join(f"ratio {x}/{y} (per round)" for x, y in pairs) + " |")
    print("|---|" + "---|" * (len(sides) + len(pairs)))
    for method in methods:
        cells = [f"{statistics.median(rates[method][side]):.1f}" for side in sides]
        for x, y in pairs:
            paired = [o / t for o, t in zip(rates[method][x], rates[method][y])]  # the same round: close in time
            cells.append(f"{statistics.median(paired):.2f} ({' '.join(f'{q:.2f}' for q in paired)})")
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"\nhardware: {hardware(a.device)}")
    print("command: python " + " ".join(sys.argv if argv is None else [sys.argv[0], *argv]))


if __name__ == "__main__":
    main()

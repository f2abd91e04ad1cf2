r"""DINO: self-distillation with no labels, the self-supervised method made for Vision Transformers.

Paper: Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, https://arxiv.org/abs/2104.14294

The method (§3.1, Algorithm 1, Figure 2): every image is cut into 2 global crops and several small ones
(multi-crop). The student (ViT + a 3-layer MLP head with K outputs) sees every crop; the teacher, the same
network whose weights are an exponential moving average of the student's (no gradient), sees the 2 global crops
only. Each student output softmax(s / 0.1) learns to match, by cross-entropy, the teacher's softmax((t - c) / tau_t)
of every global crop but its own: a global crop the other one, a small crop both ("local-to-global"). There are
no negatives and no clustering: what keeps the outputs apart is the balance of centering (c, an EMA of the
teacher's mean output, is subtracted: no output dimension may take every image) and sharpening (tau_t of 0.04-0.07
is below the student's 0.1: the teacher's output may not be uniform).

Collapse (§5.3, Figure 7): the loss is the teacher's entropy h(P_t) plus KL(P_t || P_s), logged as
teacher_entropy and kl. Uniform collapse (centering wins: every output uniform over the K dimensions):
teacher_entropy ln K (8.32 for K = 4096), kl 0 and the loss flat at ln K. One-dimension collapse (sharpening
wins: one dimension for every image): teacher_entropy and kl 0, loss 0. Both collapses have kl = 0; a run that
learns keeps kl clearly above 0 and teacher_entropy clearly below ln K. embed_std, the per-dimension std of the
L2-normalized CLS feature, is 0 at collapse and at most 1/sqrt(D) (0.072 for D = 192).

Run:
    python dino.py --epochs 100      # one GPU, ViT-Tiny/4 on CIFAR-10 (downloaded into ./data the first time)
    python dino.py --dataset folder --data-dir tests/data_sample --arch vit_mini --patch-size 8 \
        --epochs 3 --warmup-epochs 1 --batch-size 128 --out runs/dino_demo   # offline CPU demo
    torchrun --nproc_per_node=4 dino.py --batch-size 1024 ...    # 4 GPUs; --batch-size is the total
    python eval_linear.py --ckpt runs/dino/checkpoint.pt          # k-NN + linear probe

Short runs: DINO starts slowly. While the random ViT maps every image to nearly the same feature, the centred
teacher output is nearly uniform (teacher_entropy near ln K) and there is little to distil. Measured (vit_mini/8,
no small crops, batch 256, the 10,000-image CIFAR-10 subset of the README's study, seed 0):
  - The study's CPU protocol (5 epochs, 195 steps, lr 1.25e-4), k-NN / linear on the test split with all 50,000
    train labels: the student 32.65 / 40.74, the teacher 31.02 / 38.78, the untrained ViT 30.48 / 37.58. The
    teacher lags the student here (its momentum rises to 1 by the run's end: the last steps barely reach it);
    the paper evaluates the teacher, the better one over most of a long run (§5.2), and so does this file by
    default (--checkpoint-key student in eval_linear.py for the student).
  - This file's defaults (lr 5e-4), 4 epochs (156 steps), k-NN on a validation split of CIFAR-10 train (5,000
    images held out of a bank of the other 45,000: eval_linear.py --val-fraction 0.1; a k-NN on 5,000 queries has
    a binomial std of about 0.65 points), teacher / student, against the untrained ViT's 30.10 and BYOL's
    defaults' 34.18 (its momentum network: 30.14). Transfer: k-NN on tinyimagenet20 (bank its 2,000 train
    images, queries its 1,000 test images, at 32 px; std about 1.2), the untrained ViT 15.8, BYOL 19.8. The
    subsets: benchmarks/study.py's build_tree, 1,000 images of each class, seeds 0 and 1 (the second subset in
    brackets). Each row: python dino.py --dataset folder --data-dir SUBSET --arch vit_mini --patch-size 8
    --epochs 4 --batch-size 256 --knn-every 0 --out RUN with the row's flags, then python eval_linear.py --ckpt
    RUN/checkpoint.pt [--checkpoint-key student] --dataset folder --data-dir CIFAR10 --val-fraction 0.1
    --no-probe (transfer: --data-dir TINYIMAGENET20, without --val-fraction).
        the defaults                               29.36 / 29.86   (29.26 / 29.76)
            transfer                               14.8 / 15.1     (14.0 / 17.2): the teacher below random init
        --momentum 0.996, 0.95                     29.28 / 30.48, 29.54 / 30.68: no difference at this length
        4 epochs at --batch-size 64 (624 steps, 4x; the same images, 10 CPU minutes)        31.92 / 32.70
            transfer                               16.0 / 18.2
            and --centering sinkhorn --teacher-temp 0.02 --warmup-teacher-temp 0.02 --momentum 0.9
                                                   33.60 / 33.60, transfer 20.1 / 20.3
        10 epochs at --batch-size 64 (1,560 steps, 10x; 24 CPU minutes against 10)          34.24 / 34.86
            transfer                               20.8 / 20.5
            --momentum 0.996                       34.28 / 34.88, transfer 18.5 / 21.2: no difference either
        --teacher-temp 0.02 --warmup-teacher-temp 0.02            29.68 / 30.60 (lr 1.25e-4 too: 29.10 / 29.60)
            and --student-temp 0.05                30.56 / 32.10   (30.68 / 31.20)
                transfer                           16.0 / 17.1     (16.2 / 16.9)
            and --student-temp 0.05 --momentum 0.95                28.20 / 27.76
        --teacher-temp 0.01 --warmup-teacher-temp 0.01 --student-temp 0.025              29.98 / 30.22
        a head a quarter as wide (--hidden-dim 512 --bottleneck-dim 128 --out-dim 1024: 0.56M trained
        parameters instead of 6.2M, against the ViT's 2.7M)                                30.90 / 30.78
            and the 0.02 teacher, --freeze-last-layer 0                                    29.60 / 28.92
        --bottleneck-dim 32                        29.38 / 29.98
        --centering sinkhorn --teacher-temp 0.02 --warmup-teacher-temp 0.02 --momentum 0.9
                                                   31.76 / 32.78   (31.42 / 32.22)
            transfer                               19.0 / 19.5     (18.5 / 18.7)
        an earlier Sinkhorn-Knopp teacher (outside this file: each sample's softmax taken before the first
        rescaling): the defaults otherwise 29.68 / 31.92, with the small head 30.12 / 31.24, with the 0.05 / 0.02
        temperatures 30.36 / 31.84 (transfer 16.5 / 19.0), the 0.02 teacher and --momentum 0.9 32.22 / 31.86,
        --momentum 0 (the teacher is the student at the start, the cosine raising it to 1) 32.68 / 33.34
    What DINO lacks in 156 steps is steps: with the file's defaults the teacher gains -0.7 in 4 epochs at batch 256
    (156 steps); at --batch-size 64 (the lr scaled to 1.25e-4 by the linear rule) +1.8 in 4 epochs (624 steps, the
    same images) and +4.1 in 10 (1,560 steps), what BYOL gains in 156; with the Sinkhorn-Knopp centre (--centering
    sinkhorn, the 0.02 teacher, momentum 0.9) +1.7 in 156 steps and +3.5 in 624 (transfer 20.1 against random init's
    15.8). In the short runs the teacher's entropy rises towards ln K = 8.32 (the defaults: 7.71 -> 7.82, kl 0.42 ->
    0.29), in the long ones it falls after the third epoch (7.58 -> 7.16): early on, the moving-average centre does
    not stop the drift towards the uniform collapse. A colder teacher holds the entropy down (0.02: 2.3 -> 7.1, kl
    1.8 -> 0.33) and a 32-wide bottleneck keeps kl at 2.4 -> 1.5 (gradient norm 4.7 -> 1.0 against the defaults' 0.5
    -> 0.1), yet neither moves the k-NN; the backbone moves as far from its init as BYOL's (3.3-3.6 against 4.1,
    parameter distance; init norm 72.7): the direction of the step, not its size, is what differs. DINOv2's
    Sinkhorn-Knopp centre turns the drift around (with the 0.02 teacher the entropy falls 6.9 -> 5.8 and kl rises
    1.2 -> 1.9 in 156 steps) and gains the most of any short-run setting: the teacher +1.7 and +1.3 on the two
    subsets, the student +2.7 and +2.1, transfer 3 points above random init on both. The student leads the teacher
    in most settings (the teacher's momentum rises to 1 by the run's end: the last steps barely reach it). No
    default is changed: the file keeps the paper's algorithm and values; for a few CPU epochs, a smaller batch (more
    steps) and --centering sinkhorn are the measured levers, and they add up.
  - The course's short run on the shipped sample (10 epochs of 1,000 images, batch 128): the teacher's entropy
    7.38 -> 8.15, kl 0.58 -> 0.12, the teacher's k-NN 21.9 at epoch 0, 24.5 at epoch 5, 22.6 at epoch 10.
  - An earlier sweep, scored by the student's k-NN on the test split (so no setting is chosen on it any more):
    5 epochs, random init 28.6. The paper's values (momentum 0.996, temperature 0.04 -> 0.07, 8 small crops of
    2x2 patches): loss 8.23 in epoch 1, k-NN 26.0 after epoch 1. Momentum 0.99 with small crops: 26.9 after
    epoch 2; without: 28.1 after epoch 2, 28.9 after epoch 5; teacher temperature 0.02: 26.4 (teacher_entropy 2.3
    in epoch 1, 6.0 in epoch 5); lr 1.25e-4: 29.7 (29.81 with data.dino_specs' crops; teacher_entropy 7.64 ->
    7.71, kl 0.51 -> 0.37); lr 5e-4 at batch 64 (4x the steps, 3 epochs): 29.5; momentum 0.9: 27.25 (entropy 8.18:
    towards the uniform collapse); K 1024: 29.76; --no-norm-last-layer 29.78; --freeze-last-layer 0 29.77;
    10 epochs: 30.36 after epoch 5, 31.01 after 10 (loss near 8.06, kl 0.34 from epoch 4 on: slow, not stuck).
The study (benchmarks/study.py) runs it at the quarter lr. None of the settings above gains BYOL's +4 in 156
steps (each a change of DINO's own values or of its centre); DINO gets there with about ten times the steps.

Differences from the paper (and from the reference code, main_dino.py):
  - ViT (CLS token) on 32 px images instead of ViT-S/16 at 224 px; multi-crop 2x32 + 8x16 px instead of 2x224 +
    8x96 px: the small side is the paper's 96/224 of the global side rounded to the patch grid and raised to 4x4
    patches (data.small_crop_side: 13.7 px would round to 12, 3x3 patches of 4, so 16), and no small crops by
    default where that crop is more than half the global side (vit_mini/8 at 32 px; see --num-small-crops). No
    stochastic depth (the reference student: 0.1).
  - An option the paper does not have: --centering sinkhorn, DINOv2's Sinkhorn-Knopp centering (Oquab et al.,
    "DINOv2: Learning Robust Visual Features without Supervision", 2023, §4, from SwAV), written as a centre
    solved on each batch (sinkhorn_center); the default is the paper's moving average.
  - vit.py's fixed 2-D sin-cos position embedding (MoCo v3's) instead of DINO's learned one, recomputed for the
    small crops' grid instead of resampled bicubically; the patch projection Xavier-initialized as a linear layer
    (MAE's, MoCo v3's) instead of Conv2d's default.
  - K = 4096 outputs instead of 65536 (see --out-dim), batch 512 on one GPU instead of 1024 on 16.
  - The last layer's rows fixed at length 1 (main_dino.py's default); its authors train them for ViT-S
    (--no-norm-last-layer).
  - Teacher momentum 0.99 instead of 0.996: a CIFAR-10 epoch is 98 steps, not 1251 (see --momentum).
  - Teacher temperature 0.04 throughout: main_dino.py's 100-epoch ViT-S recipe; its --warmup_teacher_temp_epochs
    defaults to 0 (its help text says 30) and the paper's longer runs warm it up from 0.04 to 0.07 over 30 epochs
    (--teacher-temp 0.07 --warmup-teacher-temp-epochs 30 here; 30 is this file's default, used only when the two
    temperatures differ).
  - The crops are the reference's (data.dino_specs: areas, bicubic, jitter, grayscale, solarization of the second
    global crop) but for the blur, only from 64 px as in every recipe here (the reference blurs at p 1.0 / 0.1 /
    0.5); without small crops the global crops cover 0.14-1 of the image (the reference README's advice).
  - Gradients clipped at 3.0 as one global norm (as the other method files) instead of each parameter's own norm
    (the reference's utils.clip_gradients); the log says how often it acted (grad_norm, grad_norm_max, clipped).
  - The teacher temperature rises per step rather than per epoch, and the warmups (lr, teacher temperature) of a
    run too short for them take a quarter of it, as in the other files. No weight decay on the tokens either.
  - One checkpoint per run, replaced atomically every epoch; the reference also keeps a copy every
    --saveckp_freq epochs.
  - bf16 autocast on a GPU that has it (--precision auto; else fp16 with a scaler) instead of fp16; the head and
    its logits in fp32.
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
def dino_loss(student, teacher, center, student_temp, teacher_temp):
    """The cross-entropy H(P_t, P_s) of Algorithm 1 over every (teacher crop, other crop) pair, as the reference
    DINOLoss: the mean over the pairs (i, j), i a global crop, j any crop but i itself, of
    (1/B) sum_b -softmax((t_ib - c) / teacher_temp) . log_softmax(s_jb / student_temp).

    student: (V, B, K) logits of all V crops (the 2 global ones first); teacher: (2, B, K) logits of the 2 global
    crops (no gradient flows into them: the teacher's output is a target, sg in Algorithm 1); center: (K,) or
    (1, K). 2 (V - 1) pairs, each weighed alike. At uniform outputs the value is ln K.
    """
    V = student.shape[0]
    log_p = F.log_softmax(student.float() / student_temp, dim=-1)                  # (V, B, K) the student's
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach()      # (2, B, K) centred, sharpened
    # each sample's cross-entropy is summed over K on its own, then averaged over B, as the reference does: one
    # einsum over (b, k) would add all B*K products in one float32 dot product, 0.006 nats off ln K at V=10,
    # B=512, K=4096 (the logged loss and kl; torch's sum is a cascade, so this is within ~1e-7 of float64)
    ce = torch.stack([-(q[i] * log_p).sum(dim=-1).mean(dim=-1) for i in range(2)])  # (2, V) mean_b -q_i . log p_v
    others = ~torch.eye(2, V, dtype=torch.bool, device=student.device)  # (2, V) a crop never predicts itself
    return ce[others].mean()                                        # 2 (V - 1) terms (the reference's n_loss_terms)


@torch.no_grad()
def update_center(center, teacher, center_momentum, distributed=False):
    """c <- m c + (1 - m) mean of the teacher's logits, m the center_momentum (Algorithm 1's last line, Eq. 4), in
    place.

    center: (K,); teacher: (2, B, K) this process's logits of the 2 global crops. distributed: the mean is over
    all processes' samples (all-reduced), so every process keeps the same centre, the one of the global batch.
    """
    total = teacher.float().sum(dim=(0, 1))                         # (K,) over both crops and the batch
    count = teacher.shape[0] * teacher.shape[1]
    if distributed:
        dist.all_reduce(total)
        count *= dist.get_world_size()
    center.mul_(center_momentum).add_(total / count, alpha=1 - center_momentum)


@torch.no_grad()
def sinkhorn_center(teacher, teacher_temp, iterations=3, distributed=False):
    """DINOv2's Sinkhorn-Knopp centering (Oquab et al. 2023, §4, taken from SwAV) written as a DINO centre: the c
    for which the targets softmax((t - c) / teacher_temp) of this batch are DINOv2's, the joint (sample, output)
    table exp(t / teacher_temp) rescaled `iterations` times so that every output holds 1/K of the batch, then every
    sample 1 (that last step is the softmax over K). Each rescaling of output k multiplies its column by a factor
    a_k, so the targets are the softmax of t / teacher_temp + log a: c = -teacher_temp log a, solved on this batch
    instead of followed by an EMA. Every output takes about an equal share of each batch (the moving average only
    balances them over many steps); the sharpness still comes from teacher_temp alone.

    teacher: (2, B, K) this process's logits of the 2 global crops. distributed: the sums over samples are over
    all processes' (every process gets the same c). Returns c: (K,), defined up to a constant.
    """
    x = teacher.float().flatten(0, 1) / teacher_temp                    # (N, K) N = 2B samples of this process
    shift = torch.zeros(x.shape[1], device=x.device)                    # (K,) log a, the outputs' rescalings
    per_sample = torch.zeros(x.shape[0], 1, device=x.device)            # (N, 1) the samples' rescalings, log
    for _ in range(iterations):
        log_mass = (x + shift + per_sample).logsumexp(dim=0)            # (K,) log of each output's mass, over ...
        if distributed:                                                 # ... every process's samples
            parts = [torch.empty_like(log_mass) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, log_mass)
            log_mass = torch.stack(parts).logsumexp(dim=0)
        shift -= log_mass                                               # each output's mass: equal (the 1/K)
        per_sample = -(x + shift).logsumexp(dim=1, keepdim=True)        # each sample's: 1 (the softmax)
    return -teacher_temp * (shift - shift.mean())


# ---- model ----
class DINOHead(nn.Module):
    """The reference DINOHead (vision_transformer.py) as used with ViTs, no BatchNorm:
    Linear (2048) - GELU - Linear (2048) - GELU - Linear (256), L2-normalized, then a weight-normalized Linear to K
    without bias, w = g v / |v| per row. With norm_last_layer (the reference's default: weight_norm with weight_g
    frozen) g is fixed at 1, so the logits are cosines in [-1, 1]; without it (the reference's choice for ViT-S)
    each row's length g is learned from 1, and the logits may grow past 1."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, out_dim, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # as the reference's _init_weights (the last layer keeps torch's init)
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)  # v; the layer uses v / |v| per row
        self.last_layer_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))  # g, learned

    def forward(self, x):                                                  # (N, D)
        x = F.normalize(self.mlp(x), dim=-1)                               # (N, bottleneck) on the unit sphere
        w = F.normalize(self.last_layer.weight, dim=1)                     # (K, bottleneck) v / |v|
        if self.last_layer_g is not None:
            w = self.last_layer_g * w                                      # g v / |v|
        return x @ w.T                                                     # (N, K)


class DINO(nn.Module):
    def __init__(self, backbone, hidden_dim, bottleneck_dim, out_dim, norm_last_layer=True):
        super().__init__()
        # student g_theta_s: backbone + head, trained by the loss
        self.backbone = backbone
        self.head = DINOHead(backbone.embed_dim, hidden_dim, bottleneck_dim, out_dim, norm_last_layer)
        # teacher g_theta_t: a copy, trained only by the moving average (the reference starts them equal)
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)

    def forward(self, crops):                               # V tensors (B, C, H_v, W_v), same sizes consecutive
        # one backbone call per crop size, as the reference's MultiCropWrapper: a ViT batch needs one sequence
        # length, and vit.py gives the small crops' grid its position embedding
        cuts = [0] + [v for v in range(1, len(crops)) if crops[v].shape[-2:] != crops[v - 1].shape[-2:]]
        cuts.append(len(crops))
        h = torch.cat([self.backbone(torch.cat(crops[a:b])) for a, b in zip(cuts, cuts[1:])])  # (V*B, D) CLS
        with torch.no_grad():
            h_t = self.teacher_backbone(torch.cat(crops[:2]))  # (2B, D): the teacher sees the global crops only
        with torch.autocast(h.device.type, enabled=False):  # logits in fp32: tau_t = 0.04 magnifies rounding 25x
            s = self.head(h.float())                        # (V*B, K)
            with torch.no_grad():
                t = self.teacher_head(h_t.float())          # (2B, K)
        return h, s, t


# ---- helpers (written out in each method file on purpose: a diff between methods shows the papers' changes) ----
def cosine_schedule(step, total_steps, warmup_steps, base_value, final_value=0.0):
    """Linear warmup from 0 to base_value, then half a cosine down to final_value."""
    if step < warmup_steps:
        return base_value * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * min(t, 1.0)))


def linear_warmup(step, warmup_steps, start_value, final_value):
    """From start_value to final_value in a straight line over warmup_steps, then final_value (the teacher
    temperature: main_dino.py's np.linspace, per step here)."""
    if step < warmup_steps:
        return start_value + (final_value - start_value) * step / warmup_steps
    return final_value


@torch.no_grad()
def ema_update(target, online, m):
    """target <- m * target + (1 - m) * online for every parameter, in place (Algorithm 1: gt.params = l gt.params
    + (1 - l) gs.params, l the network momentum). target, online: modules of the same architecture; buffers stay the
    target's own; the update is no step autograd records. As moco.ema_update and byol.ema_update."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)


def param_groups(model, weight_decay):
    """No weight decay on biases, norms and tokens (as DeiT and DINO). The decayed group comes first: its weight
    decay follows a schedule."""
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
    """--num-small-crops when it is not given: the paper's 8 where a small crop is a grid of at least 4x4 patches
    (the paper's 96 px crops are 6x6 patches of 16) and at most half the global crop's side (the paper's: 0.43),
    else none (see --num-small-crops)."""
    return 8 if small_crop_size // patch_size >= 4 and 2 * small_crop_size <= img_size else 0


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
    p.add_argument("--freeze-patch-embed", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the random patch projection fixed (MoCo v3 §4.2 stability trick)")
    p.add_argument("--epochs", type=data.epoch_count, default=100, help="paper: 100-800 (ImageNet)")
    p.add_argument("--batch-size", type=data.positive_int, default=512, help="total over all processes (paper: 1024)")
    p.add_argument("--lr", type=data.positive_float, default=5e-4,
                   help="AdamW lr per 256 images; the run uses lr * batch-size / 256, cosine to 1e-6 (paper: the "
                        "same). In runs of a few hundred steps 1.25e-4 learned more here (scored on the test split "
                        "by an earlier sweep: --help-paper, 'Short runs')")
    p.add_argument("--weight-decay", type=data.nonneg_float, default=0.04,
                   help="AdamW decoupled decay at the start, raised to --weight-decay-end by a half cosine (paper: "
                        "0.04)")
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
    p.add_argument("--out", default="runs/dino", help="folder for checkpoint.pt and log.jsonl")
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
    # DINO's own (what their defaults rest on: the module docstring's "Short runs", --help-paper)
    p.add_argument("--momentum", type=data.probability, default=0.99,
                   help="the teacher's EMA weight at the start, raised to 1 by a half cosine (paper: 0.996 at 1251 "
                        "steps an epoch, a teacher that averages over 1/(1-m) = 250 steps; a CIFAR-10 epoch at batch "
                        "512 is 98 steps: 0.99, 100 steps, as byol.py. main_dino.py advises a higher value for small "
                        "batches, 0.9995 at 256, as solo-learn's CIFAR config. Measured here: 0.95, 0.99 and 0.996 gave "
                        "the same k-NN in 156-step runs, 0.99 and 0.996 in 1,560-step runs: --help-paper)")
    p.add_argument("--hidden-dim", type=data.width_int, default=2048, help="head MLP width (paper: 2048)")
    p.add_argument("--bottleneck-dim", type=data.width_int, default=256,
                   help="head bottleneck, L2-normalized (paper: 256)")
    p.add_argument("--out-dim", type=data.width_int, default=4096,
                   help="K, the head's outputs (paper: 65536 on ImageNet; CIFAR configs use 4096, solo-learn's)")
    p.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="fix the length of each of the last layer's K rows at 1 (main_dino.py's default); "
                        "--no-norm-last-layer learns it, the reference's setting for ViT-S")
    p.add_argument("--teacher-temp", type=data.positive_float, default=0.04,
                   help="teacher temperature after the warmup: below the student's, it sharpens (main_dino.py's "
                        "default and its 100-epoch ViT-S recipe: 0.04; the paper's longer runs: 0.07 after a warmup "
                        "from 0.04 over 30 epochs; 'above 0.07 is unstable'; lower it if the loss stays at ln K)")
    p.add_argument("--warmup-teacher-temp", type=data.positive_float, default=0.04,
                   help="teacher temperature at the start (paper: 0.04)")
    p.add_argument("--warmup-teacher-temp-epochs", type=data.nonneg_int, default=30,
                   help="epochs of the linear teacher-temperature warmup, when --teacher-temp differs from "
                        "--warmup-teacher-temp (paper: 30)")
    p.add_argument("--student-temp", type=data.positive_float, default=0.1, help="student temperature (paper: 0.1)")
    p.add_argument("--center-momentum", type=data.probability, default=0.9, help="the centre's EMA weight (paper: 0.9)")
    p.add_argument("--centering", default="ema", choices=["ema", "sinkhorn"],
                   help="the teacher's centre: ema, the paper's moving average of its mean output; sinkhorn, DINOv2's "
                        "Sinkhorn-Knopp centering (3 iterations on each batch: every output an equal share; "
                        "sinkhorn_center). In 156-step CPU runs it stopped the drift towards uniform targets and, with "
                        "a 0.02 teacher and --momentum 0.9, learned the most of any setting (--help-paper)")
    p.add_argument("--weight-decay-end", type=data.nonneg_float, default=0.4,
                   help="weight decay at the end (paper: 0.4)")
    p.add_argument("--freeze-last-layer", type=data.nonneg_int, default=1,
                   help="epochs at the start in which the head's last layer is not updated (paper: 1)")
    p.add_argument("--num-small-crops", type=data.crop_count, default=None,
                   help="small crops per image besides the 2 global ones (paper: 8); 0: no multi-crop (then the "
                        "global crops cover 0.14-1 of the image). Default: 8 where a small crop (--small-crop-size) is "
                        "at least 4x4 patches and at most half the global side (ViT-Tiny/4 at 32 px: 16 px crops), "
                        "else 0 (vit_mini/8 at 32 px: 4x4 patches are the whole image; with its 2x2-patch crops 0 "
                        "learned more here, k-NN 28.1 vs 26.9 after 2 epochs, at less than half the cost)")
    p.add_argument("--small-crop-size", type=data.pixel_side, default=None,
                   help="small crop side in pixels, a multiple of --patch-size. Default: the paper's 96/224 of "
                        "--img-size rounded to the patch grid and raised to 4x4 patches (data.small_crop_side): 16 "
                        "at 32 px with patch 4 (13.7 rounds to 12, raised to 16), 32 with patch 8")
    p.add_argument("--clip-grad", type=data.nonneg_float, default=3.0, help="max gradient norm (paper: 3.0); 0: off")
    return p


def train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, wd_schedule, momentum_schedule,
                    teacher_temp_schedule, epoch, args, center):
    """One epoch of DINO's Algorithm 1 (and the reference's train_one_epoch), step by step. `model` is the DINO
    module, `train_model` the same wrapped for the run (DistributedDataParallel, torch.compile) or itself.
    center: (K,) the teacher's moving-average centre, updated in place (--centering ema). Returns the epoch's
    averages."""
    device = next(model.parameters()).device
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    precision = eval_linear.resolve_precision(args.precision, device)  # main() resolved it already; tests may not
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    use_amp = device.type == "cuda" and amp_dtype is not None
    model.train()
    data.set_epoch(loader, epoch)  # this epoch's shuffle and augmentations (without it: the first one's again)
    t0, seen, loss_sum, std_sum, entropy_sum = time.time(), 0, 0.0, 0.0, 0.0
    grad_norms = []  # before clipping, one per step: how often --clip-grad acted
    bar = tqdm(loader, desc=f"dino {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True)
    for it, (crops, _) in enumerate(bar):
        # 1. schedules: learning rate, weight decay (decayed group only), the teacher's EMA weight and temperature
        step = epoch * len(loader) + it
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step)
        optimizer.param_groups[0]["weight_decay"] = wd_schedule(step)
        teacher_momentum, teacher_temp = momentum_schedule(step), teacher_temp_schedule(step)  # Algorithm 1's l

        # 2. all crops through the student, the 2 global ones through the teacher
        crops = [x.to(device, non_blocking=True) for x in crops]                  # V x (B, C, H_v, W_v)
        B, V = crops[0].shape[0], len(crops)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            h, s, t = train_model(crops)                                          # (V*B, D), (V*B, K), (2B, K)
        s, t = s.view(V, B, -1), t.view(2, B, -1)                                 # (V, B, K), (2, B, K)

        # 3. every crop's student output against the other global crop's centred, sharpened teacher output; no
        # negatives, so no gathering across processes: a sample's loss is its own, DDP averages the gradients
        # the centre: the moving average's (updated after this step, step 6), or DINOv2's, solved on this batch
        c = sinkhorn_center(t, teacher_temp, distributed=distributed) if args.centering == "sinkhorn" else center
        loss = dino_loss(s, t, c, args.student_temp, teacher_temp)
        # the collapse monitors (see step 7) with the centre this loss used: the teacher's entropy h(P_t), mean
        # over the 2B global crops, and KL(P_t || P_s) = H(P_t, P_s) - h(P_t), the loss less that entropy (every
        # teacher crop is in V - 1 pairs, so the pairs' mean entropy is this mean)
        q = F.softmax((t.float() - c) / teacher_temp, dim=-1)                    # (2, B, K)
        entropy = -(q * q.clamp_min(1e-12).log()).sum(dim=-1).mean()

        # 4. backward, clip, step; the last layer stays where it is in the first epochs (the reference cancels its
        # gradient: "doing so during the first epoch helps training"); a non-finite loss or gradient stops the run
        # before it reaches a checkpoint (loss, gradient norm and monitors come back to the CPU together: the
        # step's one sync)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if epoch < args.freeze_last_layer:
            for p in (model.head.last_layer.weight, model.head.last_layer_g):  # (g: None when fixed at 1)
                if p is not None:
                    p.grad = None  # AdamW skips a parameter without gradient: no decay either
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or float("inf"))
        embed_std = F.normalize(h[:2 * B].detach().float(), dim=1).std(dim=0).mean()  # global crops' CLS
        loss_value, grad_value, std_value, entropy_value = torch.stack(
            [loss.detach(), grad_norm.float(), embed_std, entropy]).tolist()
        # (an fp16 gradient scaler skips overflowing steps itself: there an inf gradient is routine)
        for name, value in (("loss", loss_value), ("gradient norm", None if scaler.is_enabled() else grad_value)):
            if value is not None and not math.isfinite(value):
                raise SystemExit(f"error: {name} is {value} at epoch {epoch + 1}, step {step}; stopping before "
                                 f"it reaches a checkpoint (try a lower --lr, or --precision fp32)")
        scaler.step(optimizer)
        scaler.update()

        # 5. the teacher follows the student: theta_t <- l theta_t + (1 - l) theta_s
        ema_update(model.teacher_backbone, model.backbone, teacher_momentum)
        ema_update(model.teacher_head, model.head, teacher_momentum)

        # 6. the centre follows the teacher's mean output over the global batch, after the loss that used it
        if args.centering == "ema":
            update_center(center, t, args.center_momentum, distributed)

        # 7. log: loss and the collapse monitors (uniform collapse: entropy ln K, kl 0; one dimension: both 0)
        seen += B * world
        loss_sum += loss_value
        grad_norms.append(grad_value)
        std_sum += std_value
        entropy_sum += entropy_value
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        ent=f"{entropy_value:.2f}", kl=f"{loss_value - entropy_value:.3f}",
                        img_s=f"{seen / (time.time() - t0):.0f}")

    means = torch.tensor([loss_sum, std_sum, entropy_sum], device=device) / len(loader)
    if distributed:  # each process saw its share of the global batch: average over processes
        dist.all_reduce(means)
        means /= world
    seconds = time.time() - t0
    finite = [g for g in grad_norms if math.isfinite(g)]  # (an fp16 step the scaler skipped has an inf norm)
    clip = {"grad_norm": sum(finite) / max(1, len(finite)), "grad_norm_max": max(finite, default=0.0),
            "clipped": sum(g > args.clip_grad for g in finite) / max(1, len(finite)) if args.clip_grad else 0.0}
    loss_mean, std_mean, entropy_mean = means.tolist()
    return {"loss": loss_mean, "lr": optimizer.param_groups[0]["lr"],
            "weight_decay": optimizer.param_groups[0]["weight_decay"], "momentum": teacher_momentum,
            "teacher_temp": teacher_temp,
            "embed_std": std_mean, "teacher_entropy": entropy_mean, "kl": loss_mean - entropy_mean,
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
    # DINO's multi-crop (main_dino.py): BYOL's asymmetric pair as global crops, then the small crops (without small
    # crops the global ones cover 0.14-1 of the image instead of 0.4-1, the reference README's advice)
    specs = data.dino_specs(args.img_size, n_local=args.num_small_crops, local_size=args.small_crop_size)
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
    model = DINO(backbone, args.hidden_dim, args.bottleneck_dim, args.out_dim, args.norm_last_layer).to(device)
    ddp_model = model
    if distributed:  # no BatchNorm anywhere (ViT, BN-free head): nothing to convert to SyncBatchNorm
        device_ids = None if device.index is None else [device.index]
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    train_model = torch.compile(ddp_model) if args.compile else ddp_model
    center = torch.zeros(args.out_dim, device=device)  # c, the same on every process (update_center all-reduces)

    # ---- optimizer and schedules ----
    lr = args.lr * args.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as the paper
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.999))

    def schedules_for(epochs):
        total_steps, warmup_steps = epochs * len(loader), args.warmup_epochs * len(loader)
        if warmup_steps > total_steps // 2:  # a short run (a demo, a test) would otherwise barely leave warmup
            warmup_steps = total_steps // 4
        temp_steps = args.warmup_teacher_temp_epochs * len(loader)
        if temp_steps > total_steps // 2:  # the same for the teacher temperature's warmup
            temp_steps = total_steps // 4
        return (lambda step: cosine_schedule(step, total_steps, warmup_steps, lr, 1e-6),  # main_dino.py's --min_lr
                lambda step: cosine_schedule(step, total_steps, 0, args.weight_decay, args.weight_decay_end),
                lambda step: cosine_schedule(step, total_steps, 0, args.momentum, 1.0),  # EMA weight: to 1
                lambda step: linear_warmup(step, temp_steps, args.warmup_teacher_temp, args.teacher_temp))

    lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule = schedules_for(args.epochs)
    if args.warmup_epochs * 2 > args.epochs and is_main:
        print(f"note: --warmup-epochs {args.warmup_epochs} is more than half of {args.epochs} epochs: "
              f"warming up for a quarter of the run instead")
    temp_warmup = args.warmup_teacher_temp != args.teacher_temp  # equal temperatures: no warmup to shorten
    if args.warmup_teacher_temp_epochs * 2 > args.epochs and temp_warmup and is_main:
        print(f"note: --warmup-teacher-temp-epochs {args.warmup_teacher_temp_epochs} is more than half of "
              f"{args.epochs} epochs: the teacher temperature warms up for a quarter of the run instead")

    # ---- resume ----
    start_epoch = 0
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        ckpt = eval_linear.read_checkpoint(ckpt_path)  # one line, not a traceback, if it is truncated
        is_dict = isinstance(ckpt, dict)
        if not is_dict or ckpt.get("method") != "dino" or not {"args", "model", "optimizer", "state"} <= set(ckpt):
            what = f"method {ckpt.get('method')!r}, keys {sorted(ckpt)}" if is_dict else type(ckpt).__name__
            raise SystemExit(f"error: {ckpt_path} is not a dino checkpoint of this repo ({what})")
        # the run's recipe must be the same; what may change: length, machine, logging
        # (--aug: the same recipe, other random draws)
        free = {"resume", "epochs", "workers", "device", "compile", "knn_every", "val_fraction", "download",
                "data_dir", "out", "aug", "precision"}
        ckpt["args"].setdefault("centering", "ema")  # written before --centering existed
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
        center.copy_(ckpt["state"]["center"])
        start_epoch = ckpt["epoch"]
        if is_main:
            print(f"resumed {ckpt_path} after epoch {start_epoch}")
            old_epochs, step = ckpt["args"]["epochs"], start_epoch * len(loader)
            if start_epoch >= args.epochs:
                print(f"{ckpt_path} has finished its {start_epoch} epochs: nothing to train "
                      f"(a larger --epochs continues it)")
            elif old_epochs != args.epochs:  # the cosines now end at the new length: lr and tau jump, not bit-exact
                print(f"note: --epochs {args.epochs} instead of {old_epochs}: the schedules are "
                      f"{'stretched' if args.epochs > old_epochs else 'shortened'} to "
                      f"{args.epochs} epochs; the lr of step {step} goes from "
                      f"{schedules_for(old_epochs)[0](step):.3g} to {lr_schedule(step):.3g}")

    # ---- train ----
    log_path = os.path.join(args.out, "log.jsonl")
    if start_epoch == 0:  # the untrained network's k-NN first: the baseline the later lines gain on
        knn = eval_linear.knn_eval(model.teacher_backbone, knn_train, knn_test, device) if args.knn_every else None
        if is_main:
            os.makedirs(args.out, exist_ok=True)
            with open(log_path, "w") as f:  # (replaces the log of a run that died in its first epoch)
                queries = f"val ({args.val_fraction:g} of train)" if args.val_fraction else "test"
                f.write(json.dumps({"epoch": 0, "knn_top1": knn, "knn_queries": queries}) + "\n")
            print(json.dumps({"epoch": 0, "knn_top1": knn, "knn_queries": queries}))  # the baseline, on screen too
    for epoch in range(start_epoch, args.epochs):
        stats = train_one_epoch(model, train_model, loader, optimizer, scaler, lr_schedule, wd_schedule,
                                momentum_schedule, teacher_temp_schedule, epoch, args, center)
        knn = None
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            # the teacher, the network DINO's paper and reference code evaluate (eval_knn.py's checkpoint_key)
            knn = eval_linear.knn_eval(model.teacher_backbone, knn_train, knn_test, device)  # every process takes part
        if is_main:
            # no RNG state: the views are seeded by (seed, epoch, image), the order by (seed, epoch). "backbone" is
            # the teacher's, the network the paper evaluates (§5.2: it is the better one for most of training);
            # the student's is in "model" (backbone.*): eval_linear.py --checkpoint-key student
            save_checkpoint(ckpt_path, {
                "method": "dino", "epoch": epoch + 1, "args": vars(args), "vit_kwargs": backbone.kwargs,
                "backbone": model.teacher_backbone.state_dict(), "backbone_network": "teacher",
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": {"step": (epoch + 1) * len(loader), "scaler": scaler.state_dict(), "center": center.cpu()},
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

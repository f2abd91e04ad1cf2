"""dino.py: the loss, centre and teacher update as the course's exercise 9 checks them (a number with a gradient
into the student only and ln K at uniform outputs, the centre updated in place, the EMA at l = 1 and l = 0; the
instructor's grading tests hold Algorithm 1 as a loop, its pairs, collapse values, sharpening and the exact
rules); the head (layers, the weight-normalized last layer with its norm fixed at 1); the teacher (its own
modules, the global crops only, no gradient, the momentum schedule); the centre (an EMA of the teacher's
global-crop logits, updated after the loss that used it, the same in two gloo processes as in one); the last
layer frozen for the first epochs; the teacher temperature's warmup and the weight-decay schedule; the
multi-crop recipe; the script in one process and in two on the same global batch; a checkpoint eval_linear
loads; --resume bit for bit with the centre; the collapse monitors; bad flags and NaN guards. Each test names the
bug it catches."""
import math

import pytest
import torch
import torch.nn.functional as F

import data
import dino
import eval_linear
import vit
from common import SAMPLE, assert_same_first_step, check_ema_endpoints, read_log


# ---- exercise 9: the course's own checks (the grade, against Algorithm 1 as a loop, is the instructor's) ----
@pytest.mark.ex_dino
def test_dino_loss_is_a_number_with_a_gradient_into_the_student_only_and_ln_k_at_uniform_outputs():
    """Exercise 9's checks. Catches a loss that is not a 0-dim float32 tensor, gives the student no gradient,
    gives the teacher one (no stop-gradient), or is not ln K at uniform outputs (the docstring)."""
    torch.manual_seed(0)
    s, t, c = torch.randn(4, 8, 16).requires_grad_(), torch.randn(2, 8, 16).requires_grad_(), torch.randn(16)
    loss = dino.dino_loss(s, t, c, 0.1, 0.04)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None, "the teacher's output gets a gradient"
    uniform = dino.dino_loss(torch.zeros(4, 8, 50), torch.zeros(2, 8, 50), torch.zeros(50), 0.1, 0.04)
    assert uniform.item() == pytest.approx(math.log(50), rel=1e-5)


@pytest.mark.ex_dino
def test_update_center_works_in_place_and_ema_update_at_its_end_points():
    """Exercise 9's checks. Catches a centre that is replaced instead of updated in place, changes its shape,
    records a gradient or moves at momentum 1; and a teacher update that moves the teacher at l = 1, does not
    make it the student at l = 0, replaces its tensors, or touches buffers or the student."""
    center, teacher = torch.randn(16), torch.randn(2, 8, 16).requires_grad_()
    before, same = center.clone(), center
    dino.update_center(center, teacher, 1.0)
    assert center is same and torch.equal(center, before)
    dino.update_center(center, teacher, 0.9)
    assert center is same and center.shape == (16,) and not center.requires_grad and not torch.equal(center, before)
    check_ema_endpoints(dino.ema_update)


def dinov2_targets(teacher, teacher_temp, iterations):
    """DINOv2's Sinkhorn-Knopp teacher targets as its paper and SwAV's Algorithm describe them, in float64: the
    (output, sample) table exp(t / tau) over both global crops, normalized to sum 1, then `iterations` times each
    output's row to 1/K and each sample's column to 1/N; the targets are the columns times N. (N*K, a slow
    reference with no centre in it.)"""
    Q = torch.exp(teacher.double().flatten(0, 1) / teacher_temp).T                 # (K, N)
    K, N = Q.shape
    Q = Q / Q.sum()
    for _ in range(iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / N
    return (Q * N).T                                                                # (N, K), rows sum to 1


@pytest.mark.parametrize("teacher_temp", [0.02, 0.04, 0.07])
def test_sinkhorn_center_gives_dinov2s_targets(teacher_temp):
    """Catches a Sinkhorn-Knopp centre whose softmax((t - c) / tau) is not DINOv2's targets: rows and columns
    rescaled in the other order, an output's rescaling kept from one iteration only, the sample step left out, the
    temperature applied twice or not at all, the sign of c flipped. Logits in [-1, 1] (the head's cosines), so
    |t / tau| <= 50 at tau 0.02, and every rounding in the log domain costs up to 50 u = 3e-6 relative on a
    target: t / tau, two per iteration (each output's and each sample's rescaling), c and the final softmax, about
    9 in all: 3e-5 relative (measured: 1.4e-5 at tau 0.02, 6.5e-6 at 0.04); a target below float32's smallest
    normal number (1.2e-38, at tau 0.02) is denormal, compared in absolute terms."""
    torch.manual_seed(0)
    t = torch.rand(2, 64, 100) * 2 - 1
    c = dino.sinkhorn_center(t, teacher_temp)
    assert c.shape == (100,) and c.dtype == torch.float32
    q = F.softmax((t.flatten(0, 1) - c) / teacher_temp, dim=-1)
    torch.testing.assert_close(q.double(), dinov2_targets(t, teacher_temp, 3), rtol=3e-5,
                               atol=torch.finfo(torch.float32).tiny)
    # run to convergence, every output takes an equal share of the batch (the equipartition), each sample sums to 1
    c = dino.sinkhorn_center(t, teacher_temp, iterations=200)
    q = F.softmax((t.flatten(0, 1) - c) / teacher_temp, dim=-1)
    torch.testing.assert_close(q.sum(dim=0), torch.full((100,), 128 / 100), rtol=1e-3, atol=0)


@pytest.mark.needs_dino
def test_sinkhorn_centering_reaches_the_loss_and_leaves_the_moving_average(tmp_path, monkeypatch, tiny_data):
    """Catches --centering sinkhorn not reaching the loss (the moving-average centre used instead, or the centre of
    another step's teacher output) and a moving average updated and saved beside it: every loss call gets
    sinkhorn_center of its own teacher logits at its temperature, and the checkpoint's centre stays 0."""
    calls = Spy(monkeypatch, dino, "dino_loss").calls
    dino.main(run_args(tmp_path, 1, "--batch-size", "100", "--centering", "sinkhorn", data_dir=tiny_data))
    assert len(calls) == 2
    for s, t, center, tau_s, tau_t in calls:
        torch.testing.assert_close(center, dino.sinkhorn_center(t, tau_t), rtol=0, atol=1e-6)
        assert center.abs().max() > 1e-3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["center"].abs().max() == 0


# ---- model ----
def tiny_model(K=48, seed=0, norm_last_layer=True):
    torch.manual_seed(seed)
    return dino.DINO(vit.vit_mini(img_size=16, patch_size=8), 64, 32, K, norm_last_layer)


def test_head_layers_and_the_last_layer_normalized_with_g_fixed_at_1():
    """Catches a head that is not the reference's Linear-GELU-Linear-GELU-Linear, an unnormalized bottleneck, and a
    last layer that is not weight-normalized with its norm fixed at 1: its output must be the cosines of the
    normalized bottleneck with the normalized rows, whatever the rows' lengths, and it has no gain to train."""
    head = dino.DINOHead(192, 64, 32, 48)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [tuple(m.weight.shape) for m in head.mlp[::2]] == [(64, 192), (64, 64), (32, 64)]
    assert set(head.state_dict()) == {f"mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")} | \
        {"last_layer.weight"}                                                         # no bias, no trainable g
    x = torch.randn(5, 192)
    cosines = F.normalize(head.mlp(x), dim=1) @ F.normalize(head.last_layer.weight, dim=1).T
    torch.testing.assert_close(head(x), cosines)
    with torch.no_grad():  # a row's length is not the layer's business: the norm g is 1, whatever |v|
        head.last_layer.weight.mul_(torch.rand(48, 1) * 5 + 0.1)
    torch.testing.assert_close(head(x), cosines)
    assert head(x).abs().max() <= 1 + 1e-6


def test_last_layer_with_a_learned_norm_scales_each_row_by_its_own_g():
    """Catches --no-norm-last-layer that still fixes the rows' length at 1 (g not a parameter, or not used), a g
    shared by all rows, one that does not start at 1, and a g in the default head (its checkpoints would change)."""
    head = dino.DINOHead(192, 64, 32, 48, norm_last_layer=False)
    assert set(head.state_dict()) - set(dino.DINOHead(192, 64, 32, 48).state_dict()) == {"last_layer_g"}
    g = dict(head.named_parameters())["last_layer_g"]
    assert g.requires_grad and torch.equal(g, torch.ones(48, 1))
    x = torch.randn(5, 192)
    cosines = F.normalize(head.mlp(x), dim=1) @ F.normalize(head.last_layer.weight, dim=1).T
    torch.testing.assert_close(head(x), cosines)  # g = 1 at the start: the fixed-norm head's output
    with torch.no_grad():
        g.copy_(torch.rand(48, 1) * 3 + 0.5)
    torch.testing.assert_close(head(x), cosines * g.T)  # logit k scaled by row k's own g


@pytest.mark.needs_dino
def test_learned_norm_is_frozen_with_the_last_layer_then_trained():
    """Catches a learned g that the --freeze-last-layer epochs leave training (the reference freezes every
    parameter of the last layer), or that is never trained."""
    seen = []
    fixed_batch_run(3, freeze_last_layer=1, norm_last_layer=False, spy=lambda m: seen.append(
        m.head.last_layer_g.detach().clone()))
    g0, g1, g2 = seen                                                 # before epochs 0, 1, 2
    assert torch.equal(g1, g0) and not torch.equal(g2, g1)


def test_teacher_output_comes_from_the_teacher_on_the_global_crops_only(monkeypatch):
    """Catches a teacher output computed by the student's modules (the teacher is perturbed first: at init the two
    are equal), a teacher that sees the small crops, and crops of one size sent through the ViT one by one."""
    model = tiny_model()
    with torch.no_grad():
        for p in [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    inputs = {}
    real = vit.VisionTransformer.forward
    monkeypatch.setattr(vit.VisionTransformer, "forward", lambda self, x: inputs.setdefault(
        "teacher" if self is model.teacher_backbone else "student", []).append(tuple(x.shape)) or real(self, x))
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(3)]
    h, s, t = model(crops)
    assert inputs == {"student": [(8, 3, 16, 16), (12, 3, 8, 8)], "teacher": [(8, 3, 16, 16)]}
    monkeypatch.undo()
    with torch.no_grad():
        t_want = model.teacher_head(model.teacher_backbone(torch.cat(crops[:2])))
        h_want = torch.cat([model.backbone(torch.cat(crops[:2])), model.backbone(torch.cat(crops[2:]))])
    assert t.shape == (8, 48) and s.shape == (20, 48) and not t.requires_grad and s.requires_grad
    torch.testing.assert_close(t, t_want)
    torch.testing.assert_close(h, h_want)
    torch.testing.assert_close(s, model.head(h_want))
    assert not torch.allclose(t, s[:8], atol=1e-3)  # the perturbation shows


@pytest.mark.needs_dino
def test_gradient_reaches_every_student_parameter_and_never_the_teacher():
    """Catches student parameters the loss does not reach (a detached head or backbone, a stop-gradient in the wrong
    place) and a teacher that gets gradients."""
    model = tiny_model()
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    h, s, t = model(crops)
    dino.dino_loss(s.view(4, 4, -1), t.view(2, 4, -1), torch.zeros(48), 0.1, 0.04).backward()
    for name, p in model.named_parameters():
        if name.startswith("teacher_"):
            assert not p.requires_grad and p.grad is None, name
        elif name != "backbone.pos_embed":  # the fixed sin-cos table
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- one epoch ----
def fixed_loader(n=32, n_small=2, batch_size=None):
    """The shipped sample's first n images with their crops drawn once (16 px + n_small x 8 px): the same batches
    every epoch."""
    torch.manual_seed(0)
    tf = data.multicrop_transform(16, *data.MEAN_STD["folder"], n_global=2, n_local=n_small, local_size=8)
    ds = data.build_dataset("folder", SAMPLE, "train", tf)
    items = [ds[i] for i in range(0, len(ds), len(ds) // n)][:n]
    return torch.utils.data.DataLoader(items, batch_size=batch_size or n)


def fixed_batch_run(epochs, m=0.9, freeze_last_layer=0, steps_per_epoch=1, spy=None, norm_last_layer=True):
    """train_one_epoch for `epochs` epochs over a fixed batch of 32 images (steps_per_epoch steps each), constant
    lr 1e-3, teacher temperature 0.04 and EMA weight m; spy(model) before each epoch. Returns the model."""
    args = dino.get_args_parser().parse_args(["--device", "cpu", "--epochs", str(epochs),
                                              "--freeze-last-layer", str(freeze_last_layer)])
    model = tiny_model(norm_last_layer=norm_last_layer)
    optimizer = torch.optim.AdamW(dino.param_groups(model, 0.04), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader, center = fixed_loader(32, batch_size=32 // steps_per_epoch), torch.zeros(48)
    for epoch in range(epochs):
        if spy:
            spy(model)
        dino.train_one_epoch(model, model, loader, optimizer, scaler, lambda step: 1e-3, lambda step: 0.04,
                             lambda step: m, lambda step: 0.04, epoch, args, center)
    return model


@pytest.mark.needs_dino
def test_train_one_epoch_trains_the_student_and_the_teacher_follows_by_ema():
    """Catches a step that does not train (parameters left out of the optimizer, no step), a teacher that gets
    gradients or the optimizer's update, an EMA switched off or with the weight on the wrong side."""
    snapshots = []
    model = fixed_batch_run(3, m=0.9, spy=lambda m: snapshots.append(
        {n: p.detach().clone() for n, p in m.named_parameters()}))
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith("teacher_"):
            assert not p.requires_grad and p.grad is None, name
            student = params[name.replace("teacher_", "")]
            # after the last step: m * (teacher before) + (1 - m) * (student after the optimizer step)
            torch.testing.assert_close(p, 0.9 * snapshots[-1][name] + 0.1 * student.detach())
            if name != "teacher_backbone.pos_embed":
                assert not torch.equal(p, snapshots[0][name]), f"{name} did not move"
        elif p.requires_grad:
            assert not torch.equal(p, snapshots[0][name]), f"{name} did not move"


@pytest.mark.needs_dino
def test_last_layer_frozen_for_the_first_epochs_then_trained():
    """Catches a last layer that is never frozen, always frozen, frozen for steps instead of epochs, or frozen while
    the rest of the student stands still: --freeze-last-layer 2, two steps per epoch."""
    seen = []
    fixed_batch_run(4, freeze_last_layer=2, steps_per_epoch=2, spy=lambda m: seen.append(
        (m.head.last_layer.weight.detach().clone(), m.head.mlp[0].weight.detach().clone())))
    (w0, mlp0), (w1, mlp1), (w2, _), (w3, _) = seen                  # before epochs 0, 1, 2, 3
    assert torch.equal(w1, w0) and torch.equal(w2, w0)               # epochs 0 and 1: no update, no decay
    assert not torch.equal(mlp1, mlp0)                               # while the rest trains
    assert not torch.equal(w3, w2)                                   # epoch 2: trained


# ---- the script ----
def run_args(out, epochs=2, *extra, data_dir=SAMPLE):
    """A CPU-sized run: 16 px global crops and 2 small crops of 8 px, patches of 8 px, a small head with K = 64
    (override with a later flag)."""
    return ["--dataset", "folder", "--data-dir", data_dir, "--arch", "vit_mini", "--patch-size", "8",
            "--img-size", "16", "--small-crop-size", "8", "--num-small-crops", "2", "--epochs", str(epochs),
            "--batch-size", "64", "--warmup-epochs", "1", "--workers", "0", "--hidden-dim", "256",
            "--bottleneck-dim", "64", "--out-dim", "64", "--knn-every", "0", "--device", "cpu", "--out", str(out),
            *extra]


class Spy:
    """Wraps a function of a module for one test and records its positional arguments (tensors as clones: what
    they held at the call) in calls, its keyword arguments in kwargs."""

    def __init__(self, monkeypatch, module, name):
        self.real, self.calls, self.kwargs = getattr(module, name), [], []
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args))
        self.kwargs.append(kwargs)
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory, tiny_data):
    """One run that several tests read: 4 epochs of 2 steps (batch 100), the teacher temperature warmed up from 0.04
    to 0.07 over the first 2 epochs (4 steps), --momentum 0.9; every dino_loss call and the multi-crop recipe recorded.
    Returns (out folder, dino_loss calls, dino_specs' arguments and keyword arguments)."""
    out = tmp_path_factory.mktemp("spied_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        loss, specs = Spy(monkeypatch, dino, "dino_loss"), Spy(monkeypatch, data, "dino_specs")
        dino.main(run_args(out, 4, "--batch-size", "100", "--teacher-temp", "0.07", "--warmup-teacher-temp-epochs",
                           "2", "--momentum", "0.9", data_dir=tiny_data))
    return out, loss.calls, (specs.calls[0], specs.kwargs[0])


@pytest.mark.needs_dino
def test_center_is_an_ema_of_the_teacher_logits_updated_after_the_loss(spied_run):
    """Catches a centre that is never updated, is updated before the loss that should use the old one, follows the
    student's logits or the small crops instead of the teacher's, uses another EMA weight, or is not saved: every
    loss must see c_n = 0.9 c_(n-1) + 0.1 (mean of the previous step's teacher logits), c_0 = 0."""
    out, calls, _ = spied_run
    assert len(calls) == 8
    c = torch.zeros(64)
    for s, t, center, tau_s, tau_t in calls:
        torch.testing.assert_close(center, c)
        c = 0.9 * c + 0.1 * t.mean(dim=(0, 1))                                  # t: (2, B, K)
    torch.testing.assert_close(torch.load(out / "checkpoint.pt", weights_only=True)["state"]["center"], c)


@pytest.mark.needs_dino
def test_teacher_temperature_warms_up_and_sharpens(spied_run):
    """Catches a teacher temperature that skips its warmup, does not rise in a straight line from
    --warmup-teacher-temp to --teacher-temp, or keeps rising after it; and a loss called with the student's
    temperature for the teacher (no sharpening)."""
    out, calls, _ = spied_run                                      # 8 steps, the warmup over the first 4
    assert [c[3] for c in calls] == [0.1] * 8
    assert [c[4] for c in calls] == pytest.approx([0.04, 0.0475, 0.055, 0.0625] + [0.07] * 4)
    assert [line["teacher_temp"] for line in read_log(out)] == pytest.approx([0.0475, 0.0625, 0.07, 0.07])


@pytest.mark.needs_dino
def test_momentum_and_weight_decay_schedules(spied_run):
    """Catches an EMA weight that does not rise from --momentum to 1 along the half cosine, and a weight decay that
    does not rise from --weight-decay to --weight-decay-end along its half cosine (or reaches the no-decay group)."""
    out, _, _ = spied_run
    log = read_log(out)  # 2 steps per epoch, 8 in all: each epoch logs the values of its last step
    rise = lambda k, lo, hi: hi - (hi - lo) * (math.cos(math.pi * k / 8) + 1) / 2
    assert [line["momentum"] for line in log] == pytest.approx([rise(k, 0.9, 1) for k in (1, 3, 5, 7)])
    assert [line["weight_decay"] for line in log] == pytest.approx([rise(k, 0.04, 0.4) for k in (1, 3, 5, 7)])
    optimizer = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]
    assert [g["weight_decay"] for g in optimizer["param_groups"]] == pytest.approx([rise(7, 0.04, 0.4), 0.0])


@pytest.mark.needs_dino
def test_monitors_are_the_teachers_entropy_and_the_kl(spied_run):
    """Catches a teacher_entropy of other distributions than the loss's targets (the uncentred or unsharpened
    teacher, the student's) and a kl that is not KL(P_t || P_s) over the loss's pairs (§5.3): both recomputed from
    every step's logits, each epoch's the mean of its 2 steps."""
    out, calls, _ = spied_run
    entropy, kl = [], []
    for s, t, center, tau_s, tau_t in calls:
        q, log_p = F.softmax((t - center) / tau_t, dim=-1), F.log_softmax(s / tau_s, dim=-1)  # (2, B, K), (V, B, K)
        entropy.append(-torch.special.xlogy(q, q).sum(-1).mean().item())
        pairs = [(i, j) for i in range(2) for j in range(len(s)) if j != i]
        kl.append(sum((torch.special.xlogy(q[i], q[i]) - q[i] * log_p[j]).sum(-1).mean().item()
                      for i, j in pairs) / len(pairs))
    log = read_log(out)
    assert [line["teacher_entropy"] for line in log] == pytest.approx(
        [(entropy[2 * e] + entropy[2 * e + 1]) / 2 for e in range(4)], rel=1e-4)
    assert [line["kl"] for line in log] == pytest.approx([(kl[2 * e] + kl[2 * e + 1]) / 2 for e in range(4)],
                                                          rel=1e-3, abs=1e-5)


@pytest.mark.needs_dino
def test_multicrop_recipe_reaches_student_and_teacher(spied_run, tmp_path, monkeypatch, tiny_data, capsys):
    """Catches another recipe than DINO's (data.dino_specs: crop areas global 0.4-1, small 0.05-0.4, solarization of
    the second global crop), small crops that never reach the loss, and --num-small-crops 0 not turning
    multi-crop off or keeping the narrow global crops (the reference README's 0.14-1 then); and a
    teacher-temperature warmup that is not shortened to a quarter of a run too short for it (30 epochs of 2
    here: 1 of 4 steps)."""
    _, calls, (args, kwargs) = spied_run
    built = data.dino_specs(*args, **kwargs)
    assert [s.scale for s in built] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 2
    assert [s.solarize_p for s in built] == [0.0, 0.2, 0.0, 0.0] and [s.size for s in built] == [16, 16, 8, 8]
    assert calls[0][0].shape == (4, 100, 64) and calls[0][1].shape == (2, 100, 64)
    loss, specs = Spy(monkeypatch, dino, "dino_loss"), Spy(monkeypatch, data, "dino_specs")
    dino.main(run_args(tmp_path, 2, "--batch-size", "100", "--num-small-crops", "0", "--teacher-temp", "0.07",
                       data_dir=tiny_data))
    assert [s.scale for s in specs.real(*specs.calls[0], **specs.kwargs[0])] == [(0.14, 1.0)] * 2
    assert [c[0].shape for c in loss.calls] == [(2, 100, 64)] * 4
    assert [c[4] for c in loss.calls] == pytest.approx([0.04, 0.07, 0.07, 0.07])
    assert "the teacher temperature warms up for a quarter of the run" in capsys.readouterr().out


@pytest.mark.needs_dino
@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_two_processes_equal_one_process(tmp_path, tiny_data, centering):
    """Catches a centre that is not all-reduced (each process would centre on its own half; with sinkhorn, each
    process would balance the outputs over its own half), gradients that are not averaged, and a loss or monitors
    that differ when the batch is split: one step on the same 200 images, split over two gloo processes or not,
    gives the same loss, every gradient (the last layer's too: not frozen here), the same teacher entropy and the
    same saved centre."""
    argv = run_args(tmp_path, 1, "--batch-size", "200", "--freeze-last-layer", "0", "--centering", centering,
                    data_dir=tiny_data)
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    assert_same_first_step("dino", argv, tmp_path)
    c1, c2 = [torch.load(tmp_path / f"world{w}" / "checkpoint.pt", weights_only=True)["state"]["center"]
              for w in (1, 2)]
    assert c1.abs().max() > 1e-3 if centering == "ema" else c1.abs().max() == 0  # sinkhorn: no moving average
    torch.testing.assert_close(c2, c1, rtol=1e-4, atol=1e-6)
    (log1,), (log2,) = read_log(tmp_path / "world1"), read_log(tmp_path / "world2")
    assert log1["teacher_entropy"] == pytest.approx(log2["teacher_entropy"], rel=1e-5)


@pytest.mark.needs_knn
@pytest.mark.needs_dino
def test_training_writes_a_checkpoint_eval_linear_loads(tmp_path, capsys, monkeypatch, tiny_data):
    """Catches a checkpoint without the teacher or the centre, whose backbone is not the teacher (the network DINO's
    paper evaluates) or whose student is lost, that eval_linear cannot read or evaluates on the student by
    default, and log lines without DINO's collapse monitors."""
    monitored, knn_eval = [], eval_linear.knn_eval
    monkeypatch.setattr(eval_linear, "knn_eval", lambda net, *a, **k: monitored.append(net) or knn_eval(net, *a, **k))
    model = dino.main(run_args(tmp_path, 1, "--knn-every", "1", "--img-size", "32", "--small-crop-size", "16",
                               "--batch-size", "100", data_dir=tiny_data))
    assert len(monitored) == 2 and all(net is model.teacher_backbone for net in monitored)  # epochs 0 and 1
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "dino" and ckpt["epoch"] == 1
    assert set(ckpt) >= {"method", "epoch", "args", "vit_kwargs", "backbone", "model", "optimizer", "state"}
    assert any(k.startswith("teacher_head.") for k in ckpt["model"]) and ckpt["state"]["center"].shape == (64,)
    log = read_log(tmp_path)
    assert len(log) == 1 and 10 <= log[0]["knn_top1"] <= 100
    assert 0.01 < log[0]["embed_std"] <= 192 ** -0.5 + 1e-6
    assert 0 < log[0]["teacher_entropy"] < math.log(64) and log[0]["kl"] > 0
    assert log[0]["loss"] == pytest.approx(log[0]["teacher_entropy"] + log[0]["kl"])
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()  # noqa: E731
    teacher, student = model.teacher_backbone.state_dict(), model.backbone.state_dict()
    assert not same(teacher, student)  # (the teacher lags: 0.99 of it stays where it was at every step)
    for key, expected, name in ((None, teacher, "teacher"), ("teacher", teacher, "teacher"),
                                ("student", student, "student")):
        backbone, meta = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"), checkpoint_key=key)
        assert same(backbone.state_dict(), expected) and meta["network"] == name
    eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--probe-epochs", "2", "--device", "cpu",
                      "--workers", "0"])
    assert "dino (teacher)" in capsys.readouterr().out
    rows = eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--checkpoint-key", "student", "--no-probe",
                             "--device", "cpu", "--workers", "0"])
    assert rows[0]["network"] == "student" and "dino (student)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume"):  # never overwrite a run silently
        dino.main(run_args(tmp_path, 1))


@pytest.mark.needs_dino
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, tiny_data):
    """Catches a resume that loses the centre, the teacher, the optimizer state or the schedules' position (and with
    it the last layer's freezing, the teacher temperature and the weight decay); and, since the weights must move
    in epoch 2, a run that does not train."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    dino.main(run_args(full, 2, data_dir=tiny_data))
    real_save = dino.save_checkpoint

    def save_then_die(path, ckpt):  # the run is killed right after its first checkpoint
        real_save(path, ckpt)
        raise KeyboardInterrupt

    monkeypatch.setattr(dino, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dino.main(run_args(cut, 2, data_dir=tiny_data))
    monkeypatch.setattr(dino, "save_checkpoint", real_save)
    after_one = torch.load(cut / "checkpoint.pt", weights_only=True)
    dino.main(run_args(cut, 2, "--resume", data_dir=tiny_data))
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, cut))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["state"]["center"], b["state"]["center"])
    for k in ("backbone.blocks.0.attn.qkv.weight", "teacher_backbone.blocks.0.attn.qkv.weight",
              "head.last_layer.weight"):
        assert not torch.equal(a["model"][k], after_one["model"][k]), f"{k} did not move in epoch 2"
    assert not torch.equal(a["state"]["center"], after_one["state"]["center"])
    for i, state in a["optimizer"]["state"].items():
        for k in state:
            assert torch.equal(state[k], b["optimizer"]["state"][i][k]), (i, k)
    assert read_log(full)[-1] == {**read_log(cut)[-1], "img_per_s": read_log(full)[-1]["img_per_s"],
                                  "seconds": read_log(full)[-1]["seconds"]}
    with pytest.raises(SystemExit, match="--teacher-temp 0.04 \\(now 0.07\\)"):
        dino.main(run_args(cut, 3, "--resume", "--teacher-temp", "0.07", data_dir=tiny_data))


@pytest.mark.needs_dino
def test_collapse_shows_in_the_monitors(tmp_path, monkeypatch, tiny_data):
    """Catches collapse monitors that miss either collapse of §5.3: uniform outputs (teacher entropy ln K, KL 0, loss
    ln K) and one dimension for every image (entropy 0, KL 0); and an embed_std that does not see every image on
    the same CLS feature, or that measures the head's output instead (uniform there, healthy CLS features)."""
    real_forward = dino.DINO.forward
    for name, pattern in (("uniform", torch.zeros(64)), ("one", torch.zeros(64).index_fill_(0, torch.tensor([5]), 1.))):
        def collapsed(self, crops):  # every crop of every image: the same logits (and, for "one", the same CLS)
            h, s, t = real_forward(self, crops)
            return (h if name == "uniform" else h * 0 + 1), s * 0 + pattern, t * 0 + pattern
        monkeypatch.setattr(dino.DINO, "forward", collapsed)
        dino.main(run_args(tmp_path / name, 1, "--batch-size", "200", data_dir=tiny_data))
        log = read_log(tmp_path / name)[0]
        assert abs(log["kl"]) < 0.01
        if name == "uniform":
            # float32's bound for these sums (K = 64, B = 200, 2 pairs; see the float64 test above): ~1e-6
            assert log["teacher_entropy"] == pytest.approx(math.log(64), rel=1e-5)
            assert log["loss"] == pytest.approx(math.log(64), rel=1e-5) and log["embed_std"] > 0.01
        else:
            assert log["teacher_entropy"] < 1e-3 and log["loss"] < 0.01
            assert log["embed_std"] == pytest.approx(0.0, abs=1e-6)


def test_bad_flags_give_one_line_errors(tmp_path):
    """Catches tracebacks instead of one-line messages for a bad crop size or a missing checkpoint."""
    with pytest.raises(SystemExit, match="--small-crop-size 12 is not a multiple of --patch-size 8"):
        dino.main(run_args(tmp_path, 1, "--small-crop-size", "12"))
    with pytest.raises(SystemExit, match="--img-size 30 is not a multiple of --patch-size 8"):
        dino.main(run_args(tmp_path, 1, "--img-size", "30"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        dino.main(run_args(tmp_path / "new", 1, "--resume"))


@pytest.mark.needs_dino
def test_non_finite_values_stop_with_a_clear_message(tmp_path, monkeypatch, tiny_data):
    """Catches a NaN loss, or a NaN gradient under a finite loss, that trains on and reaches the checkpoint."""
    real = dino.dino_loss
    # sqrt|s - s.detach()| adds 0 to the loss and NaN to the gradient (inf * 0 at the origin)
    monkeypatch.setattr(dino, "dino_loss", lambda s, *a: real(s, *a) + (s - s.detach()).abs().sqrt().sum())
    with pytest.raises(SystemExit, match="gradient norm is nan at epoch 1, step 0"):
        dino.main(run_args(tmp_path / "a", 1, "--batch-size", "100", data_dir=tiny_data))
    monkeypatch.setattr(dino, "dino_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 0"):
        dino.main(run_args(tmp_path / "b", 1, "--batch-size", "100", data_dir=tiny_data))
    assert not any((tmp_path / d / "checkpoint.pt").exists() for d in "ab")

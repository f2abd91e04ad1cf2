"""byol.py: the loss against the direct formula ||p/|p| - z/|z|||² (eq. 2), its range [0, 4] and its zero at
p = z; the heads' layer list; the target network (no gradient, the exact EMA rule, tau = 1 frozen, the
cosine schedule's end points, the stop-gradient on its projections); the script in one process and in two
gloo processes on the same global batch; learning on a fixed batch; --resume bit for bit with the target
network; bad flags and NaN guards. Each test names the bug it catches."""
import copy
import math

import pytest
import torch

import byol
import data
import eval_linear
import vit
from common import FixedViews, RecordingSampler, assert_same_first_step, read_log


@pytest.mark.ex_byol
@pytest.mark.parametrize("B,D", [(1, 3), (5, 8), (16, 256)])
def test_byol_loss_is_the_normalized_mse_of_eq_2(B, D):
    """Catches a loss that is not the mean of || p/|p| - z/|z| ||² (a missing normalization, a sum over the
    batch, 1 - cos instead of 2 - 2 cos)."""
    torch.manual_seed(B * D)
    p, z = torch.randn(B, D), torch.randn(B, D)
    direct = sum(((pi / pi.norm() - zi / zi.norm()) ** 2).sum().item() for pi, zi in zip(p, z)) / B
    assert byol.byol_loss(p, z).item() == pytest.approx(direct, rel=1e-5)


@pytest.mark.ex_byol
def test_byol_loss_range_and_fixed_points():
    """Catches a loss that is not 0 for aligned vectors (whatever their length), 2 for orthogonal and 4 for
    opposite ones."""
    z = torch.randn(6, 32)
    assert byol.byol_loss(3 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol.byol_loss(-z, z).item() == pytest.approx(4.0, rel=1e-6)
    assert byol.byol_loss(torch.eye(4)[:2], torch.eye(4)[2:]).item() == pytest.approx(2.0)


@pytest.mark.ex_byol
def test_heads_and_the_stop_gradient():
    """Catches heads that are not Linear-BN-ReLU-Linear (the last Linear without a bias, as the reference's
    MLP), a target with a predictor, and target projections that carry a gradient (no stop-gradient: the
    online network could pull the target to itself)."""
    model = byol.BYOL(vit.vit_mini(img_size=16, patch_size=8), 64, 32)
    kinds = lambda seq: [type(m).__name__ for m in seq]
    assert kinds(model.projector) == kinds(model.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [tuple(m.weight.shape) for m in model.predictor if isinstance(m, torch.nn.Linear)] == [(64, 32), (32, 64)]
    assert model.projector[0].bias is not None and model.projector[-1].bias is None and model.predictor[-1].bias is None
    assert not hasattr(model, "target_predictor")
    h, p, z = model(torch.randn(8, 3, 16, 16))
    assert p.requires_grad and not z.requires_grad and p.shape == z.shape == (8, 32)


@pytest.mark.ex_byol
def test_predictions_and_targets_come_from_the_modules_the_paper_names():
    """Catches targets computed by the online backbone or projector instead of the target network's, a target
    branch that runs the predictor (§3.1: the predictor is the online network's only), and predictions that skip
    the predictor or go through a target module. At initialization the target network equals the online one, so
    a branch built from the wrong modules gives the same numbers: here its weights are made different first,
    then the model's p and z must equal an explicit forward through exactly Figure 2's modules,
    p = predictor(projector(backbone(x))) and z = target_projector(target_backbone(x)), each view through the
    MLPs on its own (per-view BN)."""
    torch.manual_seed(0)
    model = byol.BYOL(vit.vit_mini(img_size=16, patch_size=8), 64, 32).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every target weight scaled by its own random factor in [0.5, 1.5)
        for w in [*model.target_backbone.parameters(), *model.target_projector.parameters()]:
            w.mul_(torch.rand(w.shape, generator=g) + 0.5)
    x1, x2 = torch.randn(2, 8, 3, 16, 16, generator=g)
    h, p, z = model(torch.cat([x1, x2]))
    with torch.no_grad():
        h_want = torch.cat([model.backbone(v) for v in (x1, x2)])
        p_want = torch.cat([model.predictor(model.projector(model.backbone(v))) for v in (x1, x2)])
        z_want = torch.cat([model.target_projector(model.target_backbone(v)) for v in (x1, x2)])
        z_online = torch.cat([model.projector(model.backbone(v)) for v in (x1, x2)])
    torch.testing.assert_close(h.detach(), h_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p.detach(), p_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, z_want, atol=1e-5, rtol=1e-4)
    assert (z - z_online).abs().max() > 0.1  # the two networks really differ here: the test can tell them apart


def fixed_batch_run(schedule_tau, steps=3, lr=1e-3, spy=None):
    """train_one_epoch for `steps` epochs of one fixed batch of 32 images; returns model, losses."""
    args = byol.get_args_parser().parse_args(["--device", "cpu", "--epochs", str(steps)])
    torch.manual_seed(0)
    model = byol.BYOL(vit.vit_mini(img_size=32, patch_size=8), 128, 32)
    optimizer = torch.optim.AdamW(byol.param_groups(model, 0.1), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = torch.utils.data.DataLoader(FixedViews(32, data.byol_transforms(32, *data.MEAN_STD["folder"])),
                                         batch_size=32)
    losses = []
    for epoch in range(steps):
        if spy:
            spy(model)
        losses.append(byol.train_one_epoch(model, model, loader, optimizer, scaler, lambda s: lr, schedule_tau,
                                           epoch, args)["loss"])
    return model, losses


@pytest.mark.needs_byol
def test_each_view_predicts_the_other_views_target_both_ways(monkeypatch):
    """Catches a loss that is not symmetrized (one direction, doubled) and a prediction scored against the
    target projection of its own view instead of the other view's."""
    calls = []
    monkeypatch.setattr(byol, "byol_loss", lambda p, z, real=byol.byol_loss: calls.append((p, z)) or real(p, z))
    before = []
    model, _ = fixed_batch_run(lambda step: 0.99, steps=1, spy=lambda m: before.append(copy.deepcopy(m)))
    (x1, x2), _ = next(iter(torch.utils.data.DataLoader(
        FixedViews(32, data.byol_transforms(32, *data.MEAN_STD["folder"])), batch_size=32)))
    with torch.no_grad():  # each view alone through the model as it was before the step (BN per view: the same)
        (_, p1, z1), (_, p2, z2) = before[0](x1, num_views=1), before[0](x2, num_views=1)
    assert len(calls) == 2
    for (p, z), (p_want, z_want) in zip(calls, [(p1, z2), (p2, z1)]):
        torch.testing.assert_close(p.detach(), p_want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(z, z_want, atol=1e-5, rtol=1e-4)


@pytest.mark.ex_byol
def test_train_one_epoch_learns_and_the_target_follows_by_ema():
    """Catches a step that does not train, a target network that gets gradients or the optimizer's update,
    and an EMA with the wrong weight (tau on the online side)."""
    snapshots = []
    spy = lambda model: snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    model, losses = fixed_batch_run(lambda step: 0.9, steps=6, spy=spy)
    assert losses[-1] < losses[0] - 0.3 and all(b < a for a, b in zip(losses, losses[1:])), losses
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith("target_"):
            assert not p.requires_grad and p.grad is None, name
            online = params[name.replace("target_", "")]
            # after the last step: tau * (target before) + (1 - tau) * (online after the optimizer step)
            torch.testing.assert_close(p, 0.9 * snapshots[-1][name] + 0.1 * online.detach())
        elif p.requires_grad:
            assert not torch.equal(p, snapshots[0][name]), f"{name} did not move"


def run_args(data_dir, out, epochs=2, *extra):
    """A CPU-sized run: 16 px images, 2x2 patches of 8 px, batch 64 (override with a later flag)."""
    return ["--dataset", "folder", "--data-dir", data_dir, "--arch", "vit_mini", "--patch-size", "8",
            "--img-size", "16", "--epochs", str(epochs), "--batch-size", "64", "--warmup-epochs", "1",
            "--workers", "0", "--hidden-dim", "256", "--knn-every", "0", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.needs_byol
def test_tau_one_freezes_the_target_and_the_schedule_ends_at_one(tiny_data, tmp_path):
    """Catches an EMA that moves the target at tau = 1, and a tau schedule that does not rise from
    --momentum to 1 along the paper's half cosine (§3.2)."""
    before = []
    model, _ = fixed_batch_run(lambda step: 1.0, steps=2,
                               spy=lambda m: before.append({k: v.clone() for k, v in m.state_dict().items()}))
    for name, p in model.named_parameters():
        if name.startswith("target_"):
            assert torch.equal(p, before[0][name]), name
    byol.main(run_args(tiny_data, tmp_path, 2, "--batch-size", "100", "--momentum", "0.9"))
    log = read_log(tmp_path)  # 2 steps per epoch, 4 in all: each epoch logs the tau of its last step
    paper = lambda k, K: 1 - (1 - 0.9) * (math.cos(math.pi * k / K) + 1) / 2  # tau from 0.9 to 1
    assert [line["momentum"] for line in log] == pytest.approx([paper(1, 4), paper(3, 4)])
    assert paper(0, 4) == pytest.approx(0.9) and paper(4, 4) == pytest.approx(1.0)


@pytest.mark.needs_byol
def test_two_processes_equal_one_process(tiny_data, tmp_path):
    """Catches a loss or gradients that differ when the batch is split over processes (gradients not
    averaged, a loss that mixes processes): one step on the same 200 images, split or not."""
    argv = run_args(tiny_data, tmp_path, 1, "--batch-size", "200")[:-2]
    assert_same_first_step("byol", argv, tmp_path)


@pytest.mark.needs_knn
@pytest.mark.needs_byol
def test_training_writes_a_checkpoint_eval_linear_loads(tiny_data, tmp_path, capsys):
    """Catches a checkpoint whose backbone is not the trained online network, that lacks the target network,
    or that eval_linear cannot read."""
    model = byol.main(run_args(tiny_data, tmp_path, 1, "--knn-every", "1"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "byol" and ckpt["epoch"] == 1
    assert any(k.startswith("target_backbone.") for k in ckpt["model"])
    log = read_log(tmp_path)
    assert 10 <= log[0]["knn_top1"] <= 100 and 0.01 < log[0]["embed_std"] <= 192 ** -0.5 + 1e-6
    assert 0.99 < log[0]["momentum"] <= 1.0 and 0 <= log[0]["loss"] <= 8  # two terms in [0, 4]
    backbone, _ = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(backbone(x), model.backbone.eval()(x))
    # --checkpoint-key teacher: the moving average, not the online network
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    teacher, meta = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"), checkpoint_key="teacher")
    assert same(teacher.state_dict(), model.target_backbone.state_dict()) and meta["network"] == "teacher"
    assert not same(teacher.state_dict(), model.backbone.state_dict())
    eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--probe-epochs", "2", "--device", "cpu",
                      "--workers", "0"])
    assert "byol" in capsys.readouterr().out


@pytest.mark.needs_byol
def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """Catches a resume that loses the target network, the optimizer state or the schedules' position; and,
    since the weights must move in epoch 2, a run that does not train."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    byol.main(run_args(tiny_data, full, 2))
    real_save = byol.save_checkpoint

    def save_then_die(path, ckpt):  # the run is killed right after its first checkpoint
        real_save(path, ckpt)
        raise KeyboardInterrupt

    monkeypatch.setattr(byol, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        byol.main(run_args(tiny_data, cut, 2))
    monkeypatch.setattr(byol, "save_checkpoint", real_save)
    after_one = torch.load(cut / "checkpoint.pt", weights_only=True)
    byol.main(run_args(tiny_data, cut, 2, "--resume"))
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, cut))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("backbone.blocks.0.attn.qkv.weight", "target_backbone.blocks.0.attn.qkv.weight"):
        assert not torch.equal(a["model"][k], after_one["model"][k]), f"{k} did not move in epoch 2"
    for i, state in a["optimizer"]["state"].items():
        for k in state:
            assert torch.equal(state[k], b["optimizer"]["state"][i][k]), (i, k)
    assert read_log(full)[-1]["loss"] == read_log(cut)[-1]["loss"]
    with pytest.raises(SystemExit, match="--momentum 0.99 \\(now 0.9\\)"):
        byol.main(run_args(tiny_data, cut, 3, "--resume", "--momentum", "0.9"))


@pytest.mark.needs_byol
def test_every_epoch_has_a_new_order(tiny_data, tmp_path, monkeypatch):
    """Catches a loop that forgets data.set_epoch (every epoch the first one's order and augmentations)."""
    monkeypatch.setattr(data, "DistributedSampler", RecordingSampler)
    monkeypatch.setattr(RecordingSampler, "orders", [])
    byol.main(run_args(tiny_data, tmp_path, 2, "--batch-size", "100"))
    assert len(RecordingSampler.orders) == 2 and RecordingSampler.orders[0] != RecordingSampler.orders[1]


@pytest.mark.needs_byol
def test_non_finite_values_stop_with_a_clear_message(tiny_data, tmp_path, monkeypatch):
    """Catches a NaN loss or gradient that trains on and reaches the checkpoint."""
    real = byol.byol_loss
    # sqrt|p - p.detach()| adds 0 to the loss and NaN to the gradient (inf * 0 at the origin)
    monkeypatch.setattr(byol, "byol_loss", lambda p, z: real(p, z) + (p - p.detach()).abs().sqrt().sum())
    with pytest.raises(SystemExit, match="gradient norm is nan at epoch 1, step 0"):
        byol.main(run_args(tiny_data, tmp_path / "a", 1, "--batch-size", "100"))
    monkeypatch.setattr(byol, "byol_loss", lambda p, z: real(p, z) * float("nan"))
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 0"):
        byol.main(run_args(tiny_data, tmp_path / "b", 1, "--batch-size", "100"))
    assert not any((tmp_path / d / "checkpoint.pt").exists() for d in "ab")

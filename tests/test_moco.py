"""moco.py: the contrastive loss against a slow loop written from MoCo v3's Algorithm 1 (with and without a
queue) and its value at collapse; the momentum encoder (no gradient, the exact EMA rule, m = 1 frozen, the
cosine schedule's end points); the queue's FIFO order and wrap-around; the script in one process and in two
gloo processes on the same global batch; learning on a fixed batch; --resume bit for bit with the momentum
encoder and the queue; the frozen patch projection; bad flags. Each test names the bug it catches."""
import math

import pytest
import torch
import torch.nn.functional as F

import data
import eval_linear
import moco
import vit
from common import FixedViews, RecordingSampler, assert_same_first_step, read_log


def ctr_slow(q, k, tau, queue=()):
    """ctr(q, k) of Algorithm 1, one query at a time: -log of the softmax of the positive key (same index)
    over all keys of the batch and the queue, cosine similarities / tau, averaged, times 2 tau."""
    total = 0.0
    for i in range(len(q)):
        cos = lambda u, v: (u @ v / (u.norm() * v.norm())).item()
        candidates = [math.exp(cos(q[i], kj) / tau) for kj in list(k) + list(queue)]
        total += -math.log(math.exp(cos(q[i], k[i]) / tau) / sum(candidates))
    return total / len(q) * 2 * tau


@pytest.mark.ex_moco
@pytest.mark.parametrize("B,D,tau,K", [(2, 3, 0.2, 0), (5, 8, 0.1, 0), (8, 16, 1.0, 16), (16, 4, 0.2, 32)])
def test_contrastive_loss_matches_algorithm_1(B, D, tau, K):
    """Catches a wrong positive index, temperature, normalization or 2 tau factor, or a queue left out."""
    torch.manual_seed(B * D + K)
    q, k = torch.randn(B, D), torch.randn(B, D)
    queue = F.normalize(torch.randn(K, D), dim=1) if K else None
    got = moco.contrastive_loss(q, k, tau, queue).item()
    assert got == pytest.approx(ctr_slow(q, k, tau, [] if queue is None else queue), rel=1e-5)


@pytest.mark.ex_moco
def test_contrastive_loss_at_collapse_and_with_rank_offsets():
    """Catches a loss whose collapse value is not 2 tau ln(G + K), and a rank offset that matches a process's
    queries to another process's keys."""
    c = torch.ones(8, 16)
    assert moco.contrastive_loss(c, c, 0.2).item() == pytest.approx(2 * 0.2 * math.log(8), rel=1e-5)
    queue = F.normalize(torch.ones(24, 16), dim=1)
    assert moco.contrastive_loss(c, c, 0.2, queue).item() == pytest.approx(2 * 0.2 * math.log(32), rel=1e-5)
    torch.manual_seed(0)
    q, k = torch.randn(8, 6), torch.randn(8, 6)
    halves = [moco.contrastive_loss(q[r * 4:(r + 1) * 4], k, 0.3, rank=r) for r in range(2)]
    torch.testing.assert_close(sum(halves) / 2, moco.contrastive_loss(q, k, 0.3))


def test_heads_follow_the_reference_build_mlp():
    """Catches heads with biases, an affine last BN, or the wrong number of layers (3-layer projector,
    2-layer predictor, out -> hidden -> out)."""
    model = moco.MoCo(vit.vit_mini(img_size=16, patch_size=8), 64, 32)
    kinds = lambda seq: [type(m).__name__ for m in seq]
    assert kinds(model.projector) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert kinds(model.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [tuple(m.weight.shape) for m in model.predictor if isinstance(m, torch.nn.Linear)] == [(64, 32), (32, 64)]
    heads = [m for n, m in model.named_modules() if "projector" in n or "predictor" in n]
    assert all(m.bias is None for m in heads if isinstance(m, torch.nn.Linear))
    assert model.projector[-1].weight is None and model.predictor[-1].weight is None  # BN without affine


def test_queries_and_keys_come_from_the_modules_algorithm_1_names():
    """Catches keys computed by the online projector or backbone instead of the momentum encoder's, a momentum
    branch that runs the predictor, and queries that skip the predictor or go through a momentum module. At
    initialization the momentum encoder equals the base encoder, so a branch built from the wrong modules gives
    the same numbers: here its weights are made different first, then the model's q and k must equal an
    explicit forward through exactly Algorithm 1's modules, q = predictor(projector(backbone(x))) and
    k = momentum_projector(momentum_backbone(x)), each view through the MLPs on its own (per-view BN)."""
    torch.manual_seed(0)
    model = moco.MoCo(vit.vit_mini(img_size=16, patch_size=8), 64, 32).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every momentum weight scaled by its own random factor in [0.5, 1.5)
        for p in [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]:
            p.mul_(torch.rand(p.shape, generator=g) + 0.5)
    x1, x2 = torch.randn(2, 8, 3, 16, 16, generator=g)
    h, q, k = model(torch.cat([x1, x2]))
    with torch.no_grad():
        h_want = torch.cat([model.backbone(v) for v in (x1, x2)])
        q_want = torch.cat([model.predictor(model.projector(model.backbone(v))) for v in (x1, x2)])
        k_want = torch.cat([model.momentum_projector(model.momentum_backbone(v)) for v in (x1, x2)])
        k_online = torch.cat([model.projector(model.backbone(v)) for v in (x1, x2)])
    torch.testing.assert_close(h.detach(), h_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q.detach(), q_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k, k_want, atol=1e-5, rtol=1e-4)
    assert not k.requires_grad and q.requires_grad
    assert (k - k_online).abs().max() > 0.1  # the two encoders really differ here: the test can tell them apart


def fixed_batch_run(schedule_m, steps=3, queue_size=0, lr=1e-3, spy=None):
    """train_one_epoch for `steps` epochs of one fixed batch of 32 images; returns model, queue, losses."""
    args = moco.get_args_parser().parse_args(["--device", "cpu", "--epochs", str(steps)])
    torch.manual_seed(0)
    model = moco.MoCo(vit.vit_mini(img_size=32, patch_size=8, freeze_patch_embed=True), 128, 32)
    optimizer = torch.optim.AdamW(moco.param_groups(model, 0.1), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = torch.utils.data.DataLoader(FixedViews(32, data.byol_transforms(32, *data.MEAN_STD["folder"])),
                                         batch_size=32)
    queue = {"keys": F.normalize(torch.randn(queue_size, 32), dim=1), "ptr": 0} if queue_size else None
    losses = []
    for epoch in range(steps):
        if spy:
            spy(model)
        losses.append(moco.train_one_epoch(model, model, loader, optimizer, scaler, lambda s: lr, schedule_m,
                                           queue, epoch, args)["loss"])
    return model, queue, losses


@pytest.mark.ex_moco
def test_train_one_epoch_learns_and_the_momentum_encoder_follows_by_ema():
    """Catches a step that does not train, a momentum encoder that gets gradients or the optimizer's update,
    and an EMA with the wrong weight (m on the online side, or m taken from another step)."""
    snapshots = []
    spy = lambda model: snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    model, _, losses = fixed_batch_run(lambda step: 0.9, steps=6, spy=spy)
    assert losses[-1] < losses[0] - 0.3 and all(b < a for a, b in zip(losses, losses[1:])), losses
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith("momentum_"):
            assert not p.requires_grad and p.grad is None, name
            online = params[name.replace("momentum_", "")]
            # after the last step: m * (momentum before) + (1 - m) * (online after the optimizer step)
            torch.testing.assert_close(p, 0.9 * snapshots[-1][name] + 0.1 * online.detach())
        elif p.requires_grad:
            assert not torch.equal(p, snapshots[0][name]), f"{name} did not move"
    assert not any(n.startswith("momentum_") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.needs_moco
def test_momentum_one_freezes_the_key_encoder_and_the_schedule_ends_at_one(tiny_data, tmp_path):
    """Catches an EMA that moves the key encoder at m = 1, and a momentum schedule that does not rise from
    --momentum to 1 along the paper's half cosine."""
    before = []
    model, _, _ = fixed_batch_run(lambda step: 1.0, steps=2,
                                 spy=lambda m: before.append({k: v.clone() for k, v in m.state_dict().items()}))
    for name, p in model.named_parameters():
        if name.startswith("momentum_"):
            assert torch.equal(p, before[0][name]), name
    moco.main(run_args(tiny_data, tmp_path, 2, "--batch-size", "100", "--momentum", "0.9"))
    log = read_log(tmp_path)  # 2 steps per epoch, 4 in all: each epoch logs the m of its last step
    paper = lambda k, K: 1 - (1 - 0.9) * (math.cos(math.pi * k / K) + 1) / 2  # §3, m from 0.9 to 1
    assert [line["momentum"] for line in log] == pytest.approx([paper(1, 4), paper(3, 4)])
    assert paper(0, 4) == pytest.approx(0.9) and paper(4, 4) == pytest.approx(1.0)


@pytest.mark.needs_moco
def test_queue_is_a_fifo_that_wraps_around(monkeypatch):
    """Catches keys enqueued out of order, a pointer that does not wrap, the current keys used as their own
    negatives, or keys that are not normalized."""
    calls = []
    real = moco.contrastive_loss

    def spy(q, k, tau, queue=None, rank=0):
        calls.append((k.detach().clone(), queue.clone()))
        return real(q, k, tau, queue, rank)

    monkeypatch.setattr(moco, "contrastive_loss", spy)
    _, queue, _ = fixed_batch_run(lambda step: 0.99, steps=3, queue_size=4 * 32)
    # per step the loss sees (q1, k2) then (q2, k1); the step's k1 then k2 go into the queue
    k1 = [F.normalize(calls[2 * s + 1][0], dim=1) for s in range(3)]
    k2 = [F.normalize(calls[2 * s][0], dim=1) for s in range(3)]
    expected = torch.cat([k1[2], k2[2], k1[1], k2[1]])  # step 3 wrapped around onto step 1's slots
    torch.testing.assert_close(queue["keys"], expected)
    assert queue["ptr"] == 2 * 32
    torch.testing.assert_close(calls[4][1][2 * 32:], torch.cat([k1[1], k2[1]]))  # step 3 saw step 2's keys
    torch.testing.assert_close(calls[4][1][:2 * 32], torch.cat([k1[0], k2[0]]))  # and step 1's


def run_args(data_dir, out, epochs=2, *extra):
    """A CPU-sized run: 16 px images, 2x2 patches of 8 px, batch 64 (override with a later flag)."""
    return ["--dataset", "folder", "--data-dir", data_dir, "--arch", "vit_mini", "--patch-size", "8",
            "--img-size", "16", "--epochs", str(epochs), "--batch-size", "64", "--warmup-epochs", "1",
            "--workers", "0", "--hidden-dim", "256", "--knn-every", "0", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.needs_moco
def test_two_processes_equal_one_process(tiny_data, tmp_path):
    """Catches keys not gathered from every process, labels not offset by rank, a queue that differs between
    processes, and gradients that are not averaged: one step on the same 200 images, split or not."""
    argv = run_args(tiny_data, tmp_path, 1, "--batch-size", "200", "--queue", "200")[:-2]
    assert_same_first_step("moco", argv, tmp_path)


@pytest.mark.needs_knn
@pytest.mark.needs_moco
def test_training_writes_a_checkpoint_eval_linear_loads(tiny_data, tmp_path, capsys):
    """Catches a checkpoint whose backbone is not the trained base encoder, or that eval_linear cannot read."""
    model = moco.main(run_args(tiny_data, tmp_path, 1, "--knn-every", "1", "--queue", "128"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "moco" and ckpt["epoch"] == 1 and ckpt["state"]["queue"]["keys"].shape == (128, 256)
    assert any(k.startswith("momentum_backbone.") for k in ckpt["model"])
    log = read_log(tmp_path)
    assert 10 <= log[0]["knn_top1"] <= 100 and 0.01 < log[0]["embed_std"] <= 192 ** -0.5 + 1e-6
    assert 0.99 < log[0]["momentum"] <= 1.0 and math.isfinite(log[0]["loss"])
    backbone, _ = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(backbone(x), model.backbone.eval()(x))
    # --checkpoint-key teacher: the moving average, not the online network
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    teacher, meta = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"), checkpoint_key="teacher")
    assert same(teacher.state_dict(), model.momentum_backbone.state_dict()) and meta["network"] == "teacher"
    assert not same(teacher.state_dict(), model.backbone.state_dict())
    eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--probe-epochs", "2", "--device", "cpu",
                      "--workers", "0"])
    assert "moco" in capsys.readouterr().out


@pytest.mark.needs_moco
def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """Catches a resume that loses the momentum encoder, the queue or its pointer, the optimizer state or the
    schedules' position; and, since the weights must move in epoch 2, a run that does not train."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ("--batch-size", "32", "--queue", "160")  # 6 steps of 2 x 32 keys: the pointer ends mid-queue
    moco.main(run_args(tiny_data, full, 2, *extra))
    real_save = moco.save_checkpoint

    def save_then_die(path, ckpt):  # the run is killed right after its first checkpoint
        real_save(path, ckpt)
        raise KeyboardInterrupt

    monkeypatch.setattr(moco, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        moco.main(run_args(tiny_data, cut, 2, *extra))
    monkeypatch.setattr(moco, "save_checkpoint", real_save)
    after_one = torch.load(cut / "checkpoint.pt", weights_only=True)
    moco.main(run_args(tiny_data, cut, 2, *extra, "--resume"))
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, cut))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["state"]["queue"]["keys"], b["state"]["queue"]["keys"])
    assert a["state"]["queue"]["ptr"] == b["state"]["queue"]["ptr"] != 0
    for k in ("backbone.blocks.0.attn.qkv.weight", "momentum_backbone.blocks.0.attn.qkv.weight"):
        assert not torch.equal(a["model"][k], after_one["model"][k]), f"{k} did not move in epoch 2"
    for i, state in a["optimizer"]["state"].items():
        for k in state:
            assert torch.equal(state[k], b["optimizer"]["state"][i][k]), (i, k)
    assert read_log(full)[-1]["loss"] == read_log(cut)[-1]["loss"]
    with pytest.raises(SystemExit, match="--momentum 0.99 \\(now 0.9\\)"):
        moco.main(run_args(tiny_data, cut, 3, *extra, "--resume", "--momentum", "0.9"))


@pytest.mark.needs_moco
def test_patch_projection_frozen_by_default(tiny_data, tmp_path):
    """Catches the paper's stability fix (a frozen random patch projection) being off by default, or a
    --no-freeze-patch-embed that does not turn it off."""
    model = moco.main(run_args(tiny_data, tmp_path / "a", 1, "--batch-size", "100"))
    assert not any(p.requires_grad for p in model.backbone.patch_embed.parameters())
    model = moco.main(run_args(tiny_data, tmp_path / "b", 1, "--batch-size", "100", "--no-freeze-patch-embed"))
    assert all(p.requires_grad for p in model.backbone.patch_embed.parameters())


@pytest.mark.needs_moco
def test_every_epoch_has_a_new_order(tiny_data, tmp_path, monkeypatch):
    """Catches a loop that forgets data.set_epoch (every epoch the first one's order and augmentations)."""
    monkeypatch.setattr(data, "DistributedSampler", RecordingSampler)
    monkeypatch.setattr(RecordingSampler, "orders", [])
    moco.main(run_args(tiny_data, tmp_path, 2, "--batch-size", "100"))
    assert len(RecordingSampler.orders) == 2 and RecordingSampler.orders[0] != RecordingSampler.orders[1]


@pytest.mark.needs_moco
def test_bad_flags_and_non_finite_values_give_one_line_errors(tiny_data, tmp_path, monkeypatch):
    """Catches a queue larger than the data or not a multiple of the batch (silent misuse), and a NaN loss
    or gradient that trains on and reaches the checkpoint."""
    with pytest.raises(SystemExit, match="--queue 256 must be a multiple of --batch-size 64 and at most the "
                                         "200 training images"):
        moco.main(run_args(tiny_data, tmp_path / "a", 1, "--queue", "256"))
    with pytest.raises(SystemExit, match="--queue 100 must be a multiple of --batch-size 64"):
        moco.main(run_args(tiny_data, tmp_path / "b", 1, "--queue", "100"))
    real = moco.contrastive_loss
    # sqrt|q - q.detach()| adds 0 to the loss and NaN to the gradient (inf * 0 at the origin)
    monkeypatch.setattr(moco, "contrastive_loss", lambda q, k, *a: real(q, k, *a) + (q - q.detach()).abs().sqrt().sum())
    with pytest.raises(SystemExit, match="gradient norm is nan at epoch 1, step 0"):
        moco.main(run_args(tiny_data, tmp_path / "c", 1, "--batch-size", "100"))
    monkeypatch.setattr(moco, "contrastive_loss", lambda q, k, *a: real(q, k, *a) * float("nan"))
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 0"):
        moco.main(run_args(tiny_data, tmp_path / "d", 1, "--batch-size", "100"))
    assert not any((tmp_path / d / "checkpoint.pt").exists() for d in "abcd")

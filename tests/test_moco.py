"""moco.py: the contrastive loss, momentum update and forward as the course's exercise 5 checks them (a scale-free
number with a gradient into the queries and 2 tau ln(G + K) at collapse, the EMA at m = 1 and m = 0, keys without
gradient; the instructor's grading tests hold Algorithm 1 as a loop and the exact rules); the heads' layers; the
momentum encoder (m = 1 frozen, the cosine schedule's end points); the queue's FIFO order and wrap-around; the
script in one process and in two gloo processes on the same global batch; --resume bit for bit with the momentum
encoder and the queue; the frozen patch projection; bad flags. Each test names the bug it catches."""
import math

import pytest
import torch
import torch.nn.functional as F

import data
import eval_linear
import moco
import vit
from common import FixedViews, RecordingSampler, assert_same_first_step, check_ema_endpoints, read_log


# ---- exercise 5: the course's own checks (the grade, against Algorithm 1 as a loop, is the instructor's) ----
@pytest.mark.ex_moco
def test_contrastive_loss_is_a_differentiable_scale_free_number_with_its_collapse_value():
    """Exercise 5's checks. Catches a loss that is not a 0-dim float32 tensor, gives the queries no gradient,
    depends on the embeddings' lengths (no cosine), or misses the collapse value the docstring gives,
    2 tau ln(G + K)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=g).requires_grad_(), torch.randn(8, 16, generator=g)
    loss = moco.contrastive_loss(q, k, 0.2)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad():
        assert moco.contrastive_loss(3 * q, 0.5 * k, 0.2).item() == pytest.approx(loss.item(), rel=1e-5)
        c, queue = torch.ones(8, 16), F.normalize(torch.ones(24, 16), dim=1)
        assert moco.contrastive_loss(c, c, 0.2).item() == pytest.approx(2 * 0.2 * math.log(8), rel=1e-5)
        assert moco.contrastive_loss(c, c, 0.2, queue).item() == pytest.approx(2 * 0.2 * math.log(32), rel=1e-5)


@pytest.mark.ex_moco
def test_ema_update_at_its_end_points():
    """Exercise 5's checks. Catches an update that moves the target at m = 1, does not make it the online network
    at m = 0, replaces its tensors, is recorded by autograd, or touches buffers or the online network."""
    check_ema_endpoints(moco.ema_update)


@pytest.mark.ex_moco
def test_forward_gives_queries_with_gradient_and_keys_without():
    """Exercise 5's checks. Catches a forward whose outputs have the wrong shapes, whose queries carry no gradient,
    or whose keys carry one (the momentum encoder gets none)."""
    torch.manual_seed(0)
    model = moco.MoCo(vit.vit_mini(img_size=16, patch_size=8), 64, 32).train()
    h, q, k = model(torch.randn(2 * 8, 3, 16, 16))
    assert h.shape == (16, model.backbone.embed_dim) and q.shape == k.shape == (16, 32)
    assert h.requires_grad and q.requires_grad and not k.requires_grad


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

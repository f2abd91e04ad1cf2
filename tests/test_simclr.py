"""simclr.py: NT-Xent against a slow loop written from the paper's Algorithm 1 and its known values; the
training script in one process and in two gloo processes on the same global batch (loss and gradients);
training that learns (loss falls, every weight moves) on a fixed set; a new order and new views every epoch;
--resume bit for bit; the NaN guards; the collapse monitor; bad flags. Each test names the bug it catches."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import eval_linear
import simclr
import vit
from common import ROOT, FixedViews, RecordingSampler, assert_same_first_step, free_port, read_log


def nt_xent_slow(z1, z2, tau):
    """Algorithm 1, literally: z_{2k-1}, z_{2k} are the two views of image k; l(i, j) for every pair."""
    z = []
    for a, b in zip(z1, z2):
        z += [a, b]
    n = len(z)  # 2N in the paper's notation

    def sim(u, v):
        return (u @ v / (u.norm() * v.norm())).item()

    def l(i, j):
        denom = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(n) if k != i)
        return -math.log(math.exp(sim(z[i], z[j]) / tau) / denom)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n // 2)) / n


@pytest.mark.ex_simclr_loss
@pytest.mark.parametrize("B,D,tau", [(2, 3, 0.5), (5, 8, 0.1), (8, 16, 1.0), (16, 4, 0.2)])
def test_nt_xent_matches_algorithm_1(B, D, tau):
    """Catches a wrong self-mask, temperature, normalization or partner index in nt_xent_loss."""
    torch.manual_seed(B * D)
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    assert simclr.nt_xent_loss(z1, z2, tau).item() == pytest.approx(nt_xent_slow(z1, z2, tau), rel=1e-5)


@pytest.mark.ex_simclr_loss
@pytest.mark.parametrize("B,tau", [(4, 0.5), (8, 0.1)])
def test_nt_xent_known_values(B, tau):
    """Catches a loss that depends on the embeddings' scale or misses ln(2B-1) at collapse."""
    z = torch.eye(16)[:B] * 3.0  # identical views of orthogonal embeddings: partner cosine 1, the rest 0
    expected = math.log(1 + (2 * B - 2) * math.exp(-1 / tau))
    assert simclr.nt_xent_loss(z, z, tau).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    c = torch.ones(B, 16)  # collapse: uniform over the 2B-1 candidates
    assert simclr.nt_xent_loss(c, c, tau).item() == pytest.approx(math.log(2 * B - 1), rel=1e-5)


@pytest.mark.ex_simclr_loss
def test_rank_offset_loss_equals_whole_batch_loss():
    """Catches a rank offset that puts a process's positives or self-mask at another process's images."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    whole = simclr.nt_xent_loss(z1, z2, 0.3)
    halves = [simclr.nt_xent_loss(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4], 0.3, z1, z2, rank=r)
              for r in range(2)]
    torch.testing.assert_close(sum(halves) / 2, whole)


def run_args(data_dir, out, epochs=2, *extra):
    """A CPU-sized run: 16 px images, 2x2 patches of 8 px, batch 64 (override with a later flag)."""
    return ["--dataset", "folder", "--data-dir", data_dir, "--arch", "vit_mini", "--patch-size", "8",
            "--img-size", "16", "--epochs", str(epochs), "--batch-size", "64", "--warmup-epochs", "1", "--workers", "0",
            "--hidden-dim", "256", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_two_processes_equal_one_process(tiny_data, tmp_path):
    """Catches the loss called with rank 0 on every process, a gather without gradient or without the other
    processes' views, and gradients that are not averaged: one step on the same 200 images, split or not."""
    argv = run_args(tiny_data, tmp_path, 1, "--batch-size", "200", "--knn-every", "0")[:-2]
    assert_same_first_step("simclr", argv, tmp_path)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_training_writes_a_checkpoint_eval_linear_loads(tiny_data, tmp_path, capsys):
    """Catches a checkpoint whose backbone is not the trained one, or that eval_linear cannot read."""
    model = simclr.main(run_args(tiny_data, tmp_path, 1, "--knn-every", "1", "--img-size", "32"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "simclr" and ckpt["epoch"] == 1
    assert set(ckpt) >= {"method", "epoch", "args", "vit_kwargs", "backbone", "model", "optimizer", "state"}
    log = read_log(tmp_path)
    assert len(log) == 1 and log[0]["epoch"] == 1 and math.isfinite(log[0]["loss"])
    assert 10 <= log[0]["knn_top1"] <= 100                     # 10 classes: a real k-NN over the sample
    assert 0.01 < log[0]["embed_std"] <= 192 ** -0.5 + 1e-6    # healthy, below its 1/sqrt(D) ceiling
    backbone, _ = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(backbone(x), model.backbone.eval()(x))  # the network that trained
    eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--probe-epochs", "2", "--device", "cpu",
                      "--workers", "0"])
    assert "simclr" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume"):  # never overwrite a run silently
        simclr.main(run_args(tiny_data, tmp_path, 1))


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
def test_train_one_epoch_learns_a_fixed_batch():
    """Catches a step that does not train (no optimizer step, a detached or zero loss, parameters left out
    of the optimizer): on one fixed batch the loss falls epoch after epoch and every trainable weight moves."""
    args = simclr.get_args_parser().parse_args(["--device", "cpu", "--epochs", "8"])
    torch.manual_seed(0)
    model = simclr.SimCLR(vit.vit_mini(img_size=32, patch_size=8), 256, 64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(simclr.param_groups(model, 0.05), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = torch.utils.data.DataLoader(FixedViews(64, [data.simclr_transform(32, *data.MEAN_STD["folder"])] * 2),
                                         batch_size=64)
    loss = [simclr.train_one_epoch(model, model, loader, optimizer, scaler, lambda step: 1e-3, epoch, args)["loss"]
            for epoch in range(8)]
    assert loss[-1] < loss[0] - 0.5 and all(b < a for a, b in zip(loss, loss[1:])), loss
    for name, p in model.named_parameters():
        assert p.requires_grad == (name != "backbone.pos_embed"), name  # the sin-cos table is fixed
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not move"


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
def test_every_epoch_has_a_new_order_and_new_views(tiny_data, tmp_path, monkeypatch):
    """Catches a loop that forgets data.set_epoch (every epoch the first one's order and augmentations) and
    a shuffle that ignores --seed."""
    monkeypatch.setattr(data, "DistributedSampler", RecordingSampler)
    monkeypatch.setattr(RecordingSampler, "orders", [])
    views = []
    real = simclr.train_one_epoch

    def spy(model, train_model, loader, *args):
        stats = real(model, train_model, loader, *args)
        views.append(next(iter(loader))[0][0][:4].clone())  # the epoch's first images, first views
        return stats

    monkeypatch.setattr(simclr, "train_one_epoch", spy)
    simclr.main(run_args(tiny_data, tmp_path / "a", 2, "--batch-size", "100", "--knn-every", "0"))
    simclr.main(run_args(tiny_data, tmp_path / "b", 1, "--batch-size", "100", "--knn-every", "0",
                         "--seed", "1"))
    # each epoch iterates the loader twice here (the epoch itself, then the spy): orders come in pairs
    first, second, other_seed = RecordingSampler.orders[0], RecordingSampler.orders[2], RecordingSampler.orders[4]
    assert sorted(first) == sorted(second) == list(range(200))
    assert first != second and first != other_seed
    assert not torch.equal(views[0], views[1])


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch, capsys):
    """Catches a resume that loses the optimizer state, the schedule position or the data stream (the cut run
    also uses another --workers), and, since the weights must move in epoch 2, a run that does not train."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    simclr.main(run_args(tiny_data, full, 2, "--knn-every", "0"))

    real_save = simclr.save_checkpoint

    def save_then_die(path, ckpt):  # the run is killed right after its first checkpoint
        real_save(path, ckpt)
        raise KeyboardInterrupt

    monkeypatch.setattr(simclr, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        simclr.main(run_args(tiny_data, cut, 2, "--knn-every", "0"))
    monkeypatch.setattr(simclr, "save_checkpoint", real_save)
    after_one = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert after_one["epoch"] == 1
    simclr.main(run_args(tiny_data, cut, 2, "--knn-every", "0", "--resume", "--workers", "2"))
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    moved = [k for k in a["backbone"] if not torch.equal(a["backbone"][k], after_one["backbone"][k])]
    assert len(moved) == len(a["backbone"]) - 1  # all but the fixed sin-cos table trained in epoch 2
    for i, state in a["optimizer"]["state"].items():
        for k in state:
            assert torch.equal(state[k], b["optimizer"]["state"][i][k]), (i, k)
    last = [read_log(p)[-1] for p in (full, cut)]
    assert last[0]["epoch"] == last[1]["epoch"] == 2 and last[0]["loss"] == last[1]["loss"]
    # a resume must continue the same recipe; a longer run says what happens to the schedule
    with pytest.raises(SystemExit, match="--temperature 0.5 \\(now 0.2\\)"):
        simclr.main(run_args(tiny_data, cut, 3, "--knn-every", "0", "--resume", "--temperature", "0.2"))
    capsys.readouterr()
    simclr.main(run_args(tiny_data, cut, 3, "--knn-every", "0", "--resume"))
    assert "--epochs 3 instead of 2: the schedule is stretched" in capsys.readouterr().out


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
def test_fp16_resume_of_a_checkpoint_without_loss_scale(tiny_data, tmp_path, monkeypatch, capsys):
    """Catches the crash 'The source state dict is empty' when an fp16 (scaled) run resumes a checkpoint that
    was written without a loss scale (on CPU, or in bf16)."""
    simclr.main(run_args(tiny_data, tmp_path, 1, "--knn-every", "0", "--batch-size", "100",
                         "--precision", "fp16"))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["scaler"] == {}
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", enabled=True))  # as on CUDA
    simclr.main(run_args(tiny_data, tmp_path, 2, "--knn-every", "0", "--batch-size", "100",
                         "--precision", "fp16", "--resume"))
    assert "holds no fp16 loss scale" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["scaler"]["scale"] > 0


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
def test_collapse_shows_in_embed_std(tiny_data, tmp_path, monkeypatch):
    """Catches a collapse monitor that measures z (forced to unit variance by the last BN) instead of h."""
    real_forward = simclr.SimCLR.forward

    def collapsed(self, x):  # every image gets the same CLS feature
        h, z = real_forward(self, x)
        return h * 0 + 1, z

    monkeypatch.setattr(simclr.SimCLR, "forward", collapsed)
    simclr.main(run_args(tiny_data, tmp_path, 1, "--knn-every", "0"))
    assert read_log(tmp_path)[0]["embed_std"] == pytest.approx(0.0, abs=1e-6)


def test_cosine_schedule_and_param_groups():
    """Catches a warmup or cosine off by a factor, and weight decay on norms, biases or tokens."""
    f = simclr.cosine_schedule
    assert [f(s, 100, 10, 1.0) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]          # linear warmup
    assert f(55, 100, 10, 1.0) == pytest.approx(0.5) and f(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    model = simclr.SimCLR(vit.vit_mini(img_size=32, patch_size=8, freeze_patch_embed=True), 64, 16)
    decay, no_decay = simclr.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"backbone.cls_token", "backbone.norm.weight",
                                                          "backbone.blocks.0.attn.qkv.bias", "head.1.weight"}
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 4 * 6 + 2
    trainable = decay["params"] + no_decay["params"]
    assert not any(n.startswith(("backbone.patch_embed", "backbone.pos_embed")) for n in map(names.get, map(id, trainable)))


@pytest.mark.needs_simclr_aug
def test_bad_flags_give_one_line_errors(tiny_data, tmp_path):
    """Catches tracebacks instead of one-line messages for a bad size, a missing checkpoint or missing data."""
    with pytest.raises(SystemExit, match="--img-size 30 is not a multiple of --patch-size 8"):
        simclr.main(run_args(tiny_data, tmp_path, 1, "--img-size", "30"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        simclr.main(run_args(tiny_data, tmp_path / "new", 1, "--resume"))
    with pytest.raises(SystemExit, match="does not exist"):
        simclr.main(run_args(tiny_data, tmp_path, 1) + ["--data-dir", str(tmp_path / "missing")])


@pytest.mark.needs_simclr_aug
def test_nan_loss_stops_with_a_clear_message(tiny_data, tmp_path, monkeypatch):
    """Catches a NaN loss that trains on and reaches the checkpoint."""
    monkeypatch.setattr(simclr, "nt_xent_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 0"):
        simclr.main(run_args(tiny_data, tmp_path, 1, "--knn-every", "0"))
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
def test_nan_gradient_with_a_finite_loss_stops(tiny_data, tmp_path, monkeypatch):
    """Catches a guard that sees only the loss: a NaN gradient (finite loss) on the epoch's last step would be
    applied and saved."""
    real = simclr.nt_xent_loss
    # sqrt|z - z.detach()| adds 0 to the loss and NaN to the gradient (inf * 0 at the origin)
    monkeypatch.setattr(simclr, "nt_xent_loss", lambda z1, z2, *a, **k: real(z1, z2, *a, **k) +
                        (z1 - z1.detach()).abs().sqrt().sum())
    with pytest.raises(SystemExit, match="gradient norm is nan at epoch 1, step 0"):
        simclr.main(run_args(tiny_data, tmp_path, 1, "--knn-every", "0", "--batch-size", "100"))
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_torchrun_two_processes_with_the_knn_monitor(tiny_data, tmp_path):
    """Catches a torchrun launch that fails, or a k-NN monitor that only some processes reach (it deadlocks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "simclr.py"), *run_args(tiny_data, tmp_path, 1, "--knn-every", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["batch_size"] == 64
    knn = read_log(tmp_path)[0]["knn_top1"]
    assert 10 <= knn <= 100
    # the sharded k-NN of the two processes is the k-NN of the saved backbone over all images
    backbone, _ = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"))
    with pytest.raises(SystemExit, match="a simclr checkpoint has one network"):  # no teacher to pick
        eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"), checkpoint_key="teacher")
    tf = data.eval_transform(16, *data.MEAN_STD["folder"])
    loaders = [data.build_loader(data.build_dataset("folder", tiny_data, s, tf), 256, 0, train=False)
               for s in ("train", "test")]
    assert eval_linear.knn_eval(backbone, *loaders, "cpu") == pytest.approx(knn, abs=1.01)  # 1 of 100 images

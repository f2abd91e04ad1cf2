"""simclr.py: NT-Xent against a slow loop written from the paper's Algorithm 1 and against its known values
(identical orthogonal pairs, ln(2B-1) at collapse); the rank-offset form used under torchrun equals the
whole-batch loss (in one process and with two real gloo processes, gradients included); a few-step CPU run
on the shipped sample writes a checkpoint eval_linear loads; --resume reproduces an uninterrupted run
bit for bit; a two-process torchrun training run reaches a checkpoint."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import eval_linear
import simclr
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "data_sample")


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


@pytest.mark.parametrize("B,D,tau", [(2, 3, 0.5), (5, 8, 0.1), (8, 16, 1.0), (16, 4, 0.2)])
def test_nt_xent_matches_algorithm_1(B, D, tau):
    torch.manual_seed(B * D)
    z1, z2 = torch.randn(B, D), torch.randn(B, D)
    assert simclr.nt_xent_loss(z1, z2, tau).item() == pytest.approx(nt_xent_slow(z1, z2, tau), rel=1e-5)


@pytest.mark.parametrize("B,tau", [(4, 0.5), (8, 0.1)])
def test_nt_xent_known_values(B, tau):
    # identical views of orthogonal embeddings: the partner has cosine 1, the 2B-2 others cosine 0
    z = torch.eye(16)[:B] * 3.0  # scale must not matter
    expected = math.log(1 + (2 * B - 2) * math.exp(-1 / tau))
    assert simclr.nt_xent_loss(z, z, tau).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # collapse: every view the same vector -> uniform over the 2B-1 candidates
    c = torch.ones(B, 16)
    assert simclr.nt_xent_loss(c, c, tau).item() == pytest.approx(math.log(2 * B - 1), rel=1e-5)


def test_rank_offset_loss_equals_whole_batch_loss():
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    whole = simclr.nt_xent_loss(z1, z2, 0.3)
    halves = [simclr.nt_xent_loss(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4], 0.3, z1, z2, rank=r)
              for r in range(2)]
    torch.testing.assert_close(sum(halves) / 2, whole)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, z1, z2, out):
    import torch.distributed as dist
    import torch.distributed.nn
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = z1.shape[0] // world
    l1 = z1[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    l2 = z2[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    z1_all = torch.cat(torch.distributed.nn.all_gather(l1))
    z2_all = torch.cat(torch.distributed.nn.all_gather(l2))
    loss = simclr.nt_xent_loss(l1, l2, 0.2, z1_all, z2_all, rank)
    loss.backward()
    # the gather's backward sums every process's gradient into this process's embeddings; DDP then divides
    # parameter gradients by the world size when it averages them, so grad / world is what reaches the weights
    out[rank] = {"loss": loss.detach(), "grad": torch.cat([l1.grad, l2.grad]) / world}
    dist.destroy_process_group()


def test_two_gloo_processes_match_single_process():
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    import torch.multiprocessing as mp
    out = mp.Manager().dict()
    mp.spawn(_gloo_worker, args=(2, free_port(), z1, z2, out), nprocs=2, join=True)
    a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = simclr.nt_xent_loss(a1, a2, 0.2)
    loss.backward()
    torch.testing.assert_close((out[0]["loss"] + out[1]["loss"]) / 2, loss.detach())
    for r in range(2):
        expected = torch.cat([a1.grad[r * 4:(r + 1) * 4], a2.grad[r * 4:(r + 1) * 4]])
        torch.testing.assert_close(out[r]["grad"], expected)


def run_args(out, epochs=2, *extra):
    return ["--dataset", "folder", "--data-dir", SAMPLE, "--arch", "vit_mini", "--patch-size", "8",
            "--epochs", str(epochs), "--batch-size", "128", "--warmup-epochs", "1", "--workers", "0",
            "--hidden-dim", "256", "--device", "cpu", "--out", str(out), *extra]


def test_training_writes_a_checkpoint_eval_linear_loads(tmp_path, capsys):
    simclr.main(run_args(tmp_path, 1, "--knn-every", "1"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "simclr" and ckpt["epoch"] == 1
    assert set(ckpt) >= {"method", "epoch", "args", "vit_kwargs", "backbone", "model", "optimizer", "state"}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["epoch"] == 1 and math.isfinite(log[0]["loss"])
    assert 10 <= log[0]["knn_top1"] <= 100                     # 10 classes: a real k-NN over the sample
    assert 0.01 < log[0]["embed_std"] <= 192 ** -0.5 + 1e-6    # healthy, below its 1/sqrt(D) ceiling
    backbone, _ = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"))
    torch.testing.assert_close(backbone.state_dict(), ckpt["backbone"])
    eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--probe-epochs", "2", "--device", "cpu",
                      "--workers", "0"])
    assert "simclr" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume"):  # never overwrite a run silently
        simclr.main(run_args(tmp_path, 1))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    simclr.main(run_args(full, 2, "--knn-every", "0"))

    real_save = simclr.save_checkpoint

    def save_then_die(path, ckpt):  # the run is killed right after its first checkpoint
        real_save(path, ckpt)
        raise KeyboardInterrupt

    monkeypatch.setattr(simclr, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        simclr.main(run_args(cut, 2, "--knn-every", "0"))
    monkeypatch.setattr(simclr, "save_checkpoint", real_save)
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == 1
    simclr.main(run_args(cut, 2, "--knn-every", "0", "--resume"))
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k in state:
            assert torch.equal(state[k], b["optimizer"]["state"][i][k]), (i, k)
    last = [json.loads((p / "log.jsonl").read_text().splitlines()[-1]) for p in (full, cut)]
    assert last[0]["epoch"] == last[1]["epoch"] == 2 and last[0]["loss"] == last[1]["loss"]
    # a resume must continue the same recipe
    with pytest.raises(SystemExit, match="--temperature 0.5 \\(now 0.2\\)"):
        simclr.main(run_args(cut, 3, "--knn-every", "0", "--resume", "--temperature", "0.2"))


def test_collapse_shows_in_embed_std(tmp_path, monkeypatch):
    real_forward = simclr.SimCLR.forward

    def collapsed(self, x):  # every image gets the same CLS feature
        h, z = real_forward(self, x)
        return h * 0 + 1, z

    monkeypatch.setattr(simclr.SimCLR, "forward", collapsed)
    simclr.main(run_args(tmp_path, 1, "--knn-every", "0"))
    log = json.loads((tmp_path / "log.jsonl").read_text())
    assert log["embed_std"] == pytest.approx(0.0, abs=1e-6)


def test_cosine_schedule_and_param_groups():
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


def test_bad_flags_give_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--img-size 30 is not a multiple of --patch-size 8"):
        simclr.main(run_args(tmp_path, 1, "--img-size", "30"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        simclr.main(run_args(tmp_path / "new", 1, "--resume"))
    with pytest.raises(SystemExit, match="does not exist"):
        simclr.main(run_args(tmp_path, 1) + ["--data-dir", str(tmp_path / "missing")])


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(simclr, "nt_xent_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 0"):
        simclr.main(run_args(tmp_path, 1, "--knn-every", "0"))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_torchrun_two_processes_reach_a_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "simclr.py"), *run_args(tmp_path, 1, "--knn-every", "0")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["batch_size"] == 128
    # the two processes trained one model: the saved backbone is what eval_linear rebuilds
    backbone, meta = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"))
    assert meta["method"] == "simclr"
    torch.testing.assert_close(backbone.state_dict(), ckpt["backbone"])

"""swav.py: Sinkhorn-Knopp and the swapped-prediction loss as the course's exercises 7 and 8 check them (codes
that are assignments balancing the prototypes, finite on a clustered batch; a loss with a gradient into the scores
and ln K at collapse; the instructor's grading tests hold the paper's loops); the prototypes on the unit sphere
and frozen at first; the queue (when it fills, when it is used, what it holds, that it is saved and restored); the
multi-crop batch that reaches the loss; the training script in one process and in two on the same global batch
(Sinkhorn's sums over the global batch); a checkpoint eval_linear loads; --resume bit for bit; the collapse
monitors; the NaN guards. Each test names the bug it catches."""
import math

import pytest
import torch

import data
import eval_linear
import swav
import vit
from common import SAMPLE, assert_same_first_step, read_log

EPSILON = swav.get_args_parser().get_default("epsilon")  # what a run without --epsilon uses


# ---- exercises 7 and 8: the course's own checks (the grade, against the paper's loops, is the instructor's) ----
def random_scores(B, K, D=128, seed=0):
    """Cosines of B unit vectors with K unit prototypes, as the model produces them (D = --out-dim)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    return z @ c.T                                                                   # (B, K)


def clustered_scores(B, K, spread, D=16, seed=0):
    """Cosines of a batch gathered around prototype 0 (z = c0 + spread * noise, normalized) with K unit
    prototypes, prototype 1 opposite to prototype 0: every sample scores near 1 with one and near -1 with the
    other. Early in training and at collapse the batch looks like this."""
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    c[1] = -c[0]
    z = torch.nn.functional.normalize(c[0] + spread * torch.randn(B, D, generator=g), dim=1)
    return z @ c.T                                                                   # (B, K)


@pytest.mark.ex_swav_sinkhorn
def test_sinkhorn_codes_are_assignments_that_balance_the_prototypes():
    """Exercise 7's checks. Catches codes of the wrong shape or dtype, with a gradient, negative or not summing to 1
    per sample (not assignments); columns that do not approach B/K with many iterations (no equipartition); and
    codes that are not finite on a batch gathered around one prototype at epsilon 0.02 (see the docstring)."""
    scores = random_scores(64, 16).requires_grad_()
    q = swav.sinkhorn(scores, 0.05, 3)
    assert q.shape == (64, 16) and q.dtype == torch.float32 and not q.requires_grad
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(swav.sinkhorn(scores, 0.05, 100).sum(dim=0), torch.full((16,), 64 / 16), rtol=1e-3,
                               atol=0)
    q = swav.sinkhorn(clustered_scores(24, 6, 0.05), 0.02, 3)
    assert torch.isfinite(q).all() and (q >= 0).all()


@pytest.mark.ex_swav_loss
def test_swav_loss_is_a_differentiable_number_with_ln_k_at_collapse():
    """Exercise 8's checks. Catches a loss that is not a 0-dim float32 tensor, gives the scores no gradient, or
    is not ln K when every crop scores every prototype alike and the codes are uniform (collapse)."""
    K = 50
    scores = (torch.rand(4, 8, K) * 2 - 1).requires_grad_()
    codes = torch.softmax(torch.randn(2, 8, K) * 3, dim=-1)
    loss = swav.swav_loss(scores, codes, 0.1)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    same = swav.swav_loss(torch.full((4, 8, K), 0.3), torch.full((2, 8, K), 1 / K), 0.1)
    assert same.item() == pytest.approx(math.log(K), rel=1e-5)


# ---- training (SwAV's crops are SimCLR's recipe, data.simclr_spec: every run needs exercise 1) ----
def run_args(out, epochs=2, *extra, data_dir=SAMPLE):
    """A CPU-sized run on the shipped sample: 16 px global crops and 2 small crops of 8 px, patches of 8 px,
    K = 32, the queue from epoch 2 (override with a later flag)."""
    return ["--dataset", "folder", "--data-dir", data_dir, "--arch", "vit_mini", "--patch-size", "8",
            "--img-size", "16", "--small-crop-size", "8", "--num-small-crops", "2", "--epochs", str(epochs),
            "--batch-size", "128", "--warmup-epochs", "1", "--workers", "0", "--hidden-dim", "256",
            "--num-prototypes", "32", "--freeze-prototypes-epochs", "1", "--queue", "256", "--queue-start-epoch", "1",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_two_processes_equal_one_process(tmp_path, tiny_data):
    """Catches Sinkhorn run on each process's half of the batch (no all-reduce), gradients that are not
    averaged, and a queue or a checkpointed queue that breaks under torchrun: one step on the same 200 images
    with multi-crop, split over two gloo processes or not, gives the same loss and every gradient (the
    prototypes' too: not frozen here)."""
    argv = run_args(tmp_path, 1, data_dir=tiny_data)[:-2] + ["--batch-size", "200", "--knn-every", "0",
                                                        "--freeze-prototypes-epochs", "0", "--queue", "400",
                                                        "--queue-start-epoch", "0"]
    assert_same_first_step("swav", argv, tmp_path)
    # both saved the queues of all processes: the 2 x 200 global crops' embeddings (in another order) and zeros
    q1, q2 = [torch.load(tmp_path / f"world{w}" / "checkpoint.pt", weights_only=True)["state"]["queue"] for w in (1, 2)]
    assert q1.shape == q2.shape == (2, 400, 128)
    assert ((q2.norm(dim=-1) - 1).abs() < 1e-5).sum(dim=1).tolist() == [200, 200]
    torch.testing.assert_close(q2.sum(dim=1), q1.sum(dim=1), rtol=1e-4, atol=1e-4)
    # and the collapse monitors describe the global batch, not a process's half
    (log1,), (log2,) = read_log(tmp_path / "world1"), read_log(tmp_path / "world2")
    assert log1["prototypes_used"] == log2["prototypes_used"] > 1
    assert log1["codes_entropy"] == pytest.approx(log2["codes_entropy"], rel=1e-5)


class Spy:
    """Wraps a function of a module for one test and records what it was called with (and returned)."""

    def __init__(self, monkeypatch, module, name):
        self.real, self.calls = getattr(module, name), []
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_multicrop_batch_reaches_the_loss(tmp_path, monkeypatch, tiny_data):
    """Catches small crops that never reach the loss or the backbone, crops of one size sent through the ViT
    one by one instead of as one batch, codes computed for a small crop, --num-small-crops 0 not turning
    multi-crop off, and a --color-strength that never reaches the crops."""
    for n_small in (3, 0):
        backbone_inputs = []
        monkeypatch.setattr(vit.VisionTransformer, "forward", lambda self, x, real=vit.VisionTransformer.forward:
                            backbone_inputs.append(tuple(x.shape)) or real(self, x))
        loss, crops = Spy(monkeypatch, swav, "swav_loss"), Spy(monkeypatch, data, "multicrop_specs")
        swav.main(run_args(tmp_path / str(n_small), 1, "--knn-every", "0", "--batch-size", "100",
                           "--num-small-crops", str(n_small), "--queue", "0", "--color-strength", "0.3",
                           data_dir=tiny_data))
        monkeypatch.undo()
        assert crops.calls[0][1]["strength"] == 0.3
        (scores, codes, tau), _, _ = loss.calls[0]
        assert len(loss.calls) == 2 and scores.shape == (2 + n_small, 100, 32) and codes.shape == (2, 100, 32)
        expected = [(200, 3, 16, 16)] + ([(100 * n_small, 3, 8, 8)] if n_small else [])
        assert backbone_inputs == expected * 2                                # one call per crop size and step
        # the codes belong to the two global crops: they follow those crops' scores
        for i in range(2):
            torch.testing.assert_close(codes[i], swav.sinkhorn(scores[i], EPSILON, 3))


def fixed_loader(n=64, n_small=2, batch_size=None):
    """The shipped sample's first n images with their crops drawn once (16 px + n_small x 8 px): the same
    batches every epoch (one batch of all n unless batch_size says otherwise)."""
    torch.manual_seed(0)
    tf = data.multicrop_transform(16, *data.MEAN_STD["folder"], n_global=2, n_local=n_small, local_size=8)
    ds = data.build_dataset("folder", SAMPLE, "train", tf)
    items = [ds[i] for i in range(0, len(ds), len(ds) // n)][:n]
    return torch.utils.data.DataLoader(items, batch_size=batch_size or n)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
@pytest.mark.parametrize("batch_size", [8, 4])  # 2 and 4 steps an epoch
def test_prototypes_unit_norm_every_step_and_frozen_for_the_first_epoch(batch_size):
    """Catches prototypes that are not re-normalized before each forward (the scores would stop being
    cosines), that move during the first epoch (the reference's freezing, the default), or that stay frozen
    after it; and a freezing counted in steps rather than in epochs of the loader at hand (a fixed count is one
    epoch at one batch size only, which is why two batch sizes are checked)."""
    args = swav.get_args_parser().parse_args(["--device", "cpu", "--epochs", "3", "--queue", "0"])
    assert args.freeze_prototypes_epochs == 1
    torch.manual_seed(0)
    model = swav.SwAV(vit.vit_mini(img_size=16, patch_size=8), 64, 16, 20)
    seen = []  # the prototypes every forward uses
    model.prototypes.register_forward_pre_hook(lambda m, x: seen.append(m.weight.detach().clone()))
    optimizer = torch.optim.AdamW(swav.param_groups(model, 0.05), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = fixed_loader(16, batch_size=batch_size)
    steps = len(loader)
    assert steps == 16 // batch_size
    for epoch in range(3):
        swav.train_one_epoch(model, model, loader, optimizer, scaler, lambda step: 1e-3, epoch, args)
    assert len(seen) == 3 * steps
    for w in seen:
        torch.testing.assert_close(w.norm(dim=1), torch.ones(20))
    for step in range(1, steps + 1):  # the first epoch's updates leave them: the weights of steps 1..S are step 0's
        torch.testing.assert_close(seen[step], seen[0], rtol=0, atol=1e-6)
    for step in range(steps + 1, 3 * steps):  # from the second epoch's first update on, every step moves them
        assert (seen[step] - seen[step - 1]).abs().max() > 1e-4, step


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_train_one_epoch_learns_a_fixed_batch():
    """Catches a step that does not train (no optimizer step, a detached or zero loss, parameters left out
    of the optimizer): on one fixed batch the loss falls and every trainable weight moves."""
    args = swav.get_args_parser().parse_args(["--device", "cpu", "--epochs", "8", "--freeze-prototypes-epochs", "2",
                                              "--queue", "0"])
    torch.manual_seed(0)
    model = swav.SwAV(vit.vit_mini(img_size=16, patch_size=8), 256, 64, 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(swav.param_groups(model, 0.05), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = fixed_loader(64)
    loss = [swav.train_one_epoch(model, model, loader, optimizer, scaler, lambda step: 1e-3, epoch, args)["loss"]
            for epoch in range(8)]
    assert loss[-1] < loss[0] - 0.3 and loss[-1] < min(loss[:4]), loss
    for name, p in model.named_parameters():
        assert p.requires_grad == (name != "backbone.pos_embed"), name  # the sin-cos table is fixed
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not move"


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_queue_fills_then_joins_the_codes(tmp_path, monkeypatch, tiny_data):
    """Catches a queue that starts before --queue-start-epoch, is used before it is full (its empty zero rows
    would take a share of the equipartition), is not used once full, holds other features than the latest
    global crops' embeddings (newest first), scores its features with stale prototypes, or lets the codes of
    queued features stand in for the batch's. 5 steps per epoch of 40 images, a queue of 80 = 2 batches."""
    embeddings, prototypes = [], []
    real_forward = swav.SwAV.forward

    def forward(self, crops):
        h, z, scores = real_forward(self, crops)
        embeddings.append(z.detach().view(len(crops), crops[0].shape[0], -1)[:2].clone())  # (2, B, out_dim)
        prototypes.append(self.prototypes.weight.detach().clone())
        return h, z, scores

    monkeypatch.setattr(swav.SwAV, "forward", forward)
    sk, loss = Spy(monkeypatch, swav, "sinkhorn"), Spy(monkeypatch, swav, "swav_loss")
    swav.main(run_args(tmp_path, 2, "--knn-every", "0", "--batch-size", "40", "--queue", "80", data_dir=tiny_data))
    rows = [args[0].shape[0] for args, _, _ in sk.calls]                   # 2 calls per step
    assert rows == [40] * 2 * (5 + 2) + [80 + 40] * 2 * 3                  # epoch 1, then filling, then full
    for step in (7, 8, 9):   # the queue's scores: the last 2 batches' embeddings, newest first, today's prototypes
        for i in range(2):
            (s, *_), _, q = sk.calls[2 * step + i]
            queued = torch.cat([embeddings[step - 1][i], embeddings[step - 2][i]])                  # (80, out_dim)
            torch.testing.assert_close(s[:80], queued @ prototypes[step].T)
            torch.testing.assert_close(loss.calls[step][0][1][i], q[-40:])  # the batch's codes, not the queue's
    queue = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["queue"]
    torch.testing.assert_close(queue, torch.stack([torch.cat([embeddings[9][i], embeddings[8][i]]) for i in range(2)]))


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_knn
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_training_writes_a_checkpoint_eval_linear_loads(tmp_path, capsys, tiny_data):
    """Catches a checkpoint whose backbone is not the trained one, or that eval_linear cannot read, and log lines
    without SwAV's collapse monitors."""
    model = swav.main(run_args(tmp_path, 1, "--knn-every", "1", "--img-size", "32", "--small-crop-size", "16",
                               "--batch-size", "100", data_dir=tiny_data))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "swav" and ckpt["epoch"] == 1
    assert set(ckpt) >= {"method", "epoch", "args", "vit_kwargs", "backbone", "model", "optimizer", "state"}
    log = read_log(tmp_path)
    assert len(log) == 1 and log[0]["epoch"] == 1 and math.isfinite(log[0]["loss"])
    assert 10 <= log[0]["knn_top1"] <= 100                     # 10 classes: a real k-NN over the sample
    assert 0.01 < log[0]["embed_std"] <= 192 ** -0.5 + 1e-6    # healthy, below its 1/sqrt(D) ceiling
    assert 1 < log[0]["prototypes_used"] <= 32 and 0 < log[0]["codes_entropy"] < math.log(32)
    backbone, _ = eval_linear.load_backbone(str(tmp_path / "checkpoint.pt"))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(backbone(x), model.backbone.eval()(x))  # the network that trained
    eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--probe-epochs", "2", "--device", "cpu",
                      "--workers", "0"])
    assert "swav" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume"):  # never overwrite a run silently
        swav.main(run_args(tmp_path, 1))


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, capsys, tiny_data):
    """Catches a resume that loses the queue, the optimizer state, the schedule position (and with it the
    prototypes' freezing) or the data stream (the cut run also uses another --workers): the queue fills in
    epoch 1 (2 steps of 100 images) and is used from the first step of epoch 2; the prototypes thaw there too."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ("--knn-every", "0", "--batch-size", "100", "--queue", "200", "--queue-start-epoch", "0",
            "--freeze-prototypes-epochs", "1", "--data-dir", tiny_data)
    swav.main(run_args(full, 2, *args))

    real_save = swav.save_checkpoint

    def save_then_die(path, ckpt):  # the run is killed right after its first checkpoint
        real_save(path, ckpt)
        raise KeyboardInterrupt

    monkeypatch.setattr(swav, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        swav.main(run_args(cut, 2, *args))
    monkeypatch.setattr(swav, "save_checkpoint", real_save)
    after_one = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert after_one["epoch"] == 1 and after_one["state"]["queue"].shape == (2, 200, 128)
    swav.main(run_args(cut, 2, *args, "--resume", "--workers", "2"))
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["state"]["queue"], b["state"]["queue"])
    moved = [k for k in a["backbone"] if not torch.equal(a["backbone"][k], after_one["backbone"][k])]
    assert len(moved) == len(a["backbone"]) - 1  # all but the fixed sin-cos table trained in epoch 2
    assert not torch.equal(a["model"]["prototypes.weight"], after_one["model"]["prototypes.weight"])  # unfrozen
    for i, state in a["optimizer"]["state"].items():
        for k in state:
            assert torch.equal(state[k], b["optimizer"]["state"][i][k]), (i, k)
    last = [read_log(p)[-1] for p in (full, cut)]
    assert last[0]["epoch"] == last[1]["epoch"] == 2 and last[0]["loss"] == last[1]["loss"]
    # a resume must continue the same recipe; a longer run says what happens to the schedule
    with pytest.raises(SystemExit, match=f"--epsilon {EPSILON} \\(now 0.03\\)"):
        swav.main(run_args(cut, 3, *args, "--resume", "--epsilon", "0.03"))
    capsys.readouterr()
    swav.main(run_args(cut, 3, *args, "--resume"))
    assert "--epochs 3 instead of 2: the schedule is stretched" in capsys.readouterr().out


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_collapse_shows_in_the_monitors(tmp_path, monkeypatch, tiny_data):
    """Catches collapse monitors that measure z (on the unit sphere by construction) instead of h, or that miss
    one cluster for everything (1 prototype used) and uniform codes (entropy ln K)."""
    real_forward = swav.SwAV.forward

    def collapsed(self, crops):  # every crop of every image gets the same CLS feature and scores (z only
        h, z, scores = real_forward(self, crops)  # feeds the queue, off here: left as it is)
        return h * 0 + 1, z, scores * 0 + scores[:1]

    monkeypatch.setattr(swav.SwAV, "forward", collapsed)
    swav.main(run_args(tmp_path, 1, "--knn-every", "0", "--batch-size", "100", data_dir=tiny_data))
    log = read_log(tmp_path)[0]
    assert log["embed_std"] == pytest.approx(0.0, abs=1e-6) and log["prototypes_used"] == 1
    assert log["codes_entropy"] == pytest.approx(math.log(32), rel=1e-5) and log["loss"] >= math.log(32) - 1e-5


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_bad_flags_give_one_line_errors(tmp_path, capsys, tiny_data):
    """Catches tracebacks instead of one-line messages for a bad crop size or a missing checkpoint, and a queue
    that is not a multiple of the batch used as it is."""
    with pytest.raises(SystemExit, match="--small-crop-size 12 is not a multiple of --patch-size 8"):
        swav.main(run_args(tmp_path, 1, "--small-crop-size", "12"))
    with pytest.raises(SystemExit, match="--img-size 30 is not a multiple of --patch-size 8"):
        swav.main(run_args(tmp_path, 1, "--img-size", "30"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        swav.main(run_args(tmp_path / "new", 1, "--resume"))
    capsys.readouterr()
    swav.main(run_args(tmp_path / "q", 1, "--knn-every", "0", "--batch-size", "100", "--queue", "250",
                       "--queue-start-epoch", "0", data_dir=tiny_data))
    assert "--queue 250 is not a multiple of --batch-size 100: using 200" in capsys.readouterr().out
    assert torch.load(tmp_path / "q" / "checkpoint.pt", weights_only=True)["state"]["queue"].shape == (2, 200, 128)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch, tiny_data):
    """Catches a NaN loss that trains on and reaches the checkpoint."""
    monkeypatch.setattr(swav, "swav_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 0"):
        swav.main(run_args(tmp_path, 1, "--knn-every", "0", "--batch-size", "100", data_dir=tiny_data))
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_nan_gradient_with_a_finite_loss_stops(tmp_path, monkeypatch, tiny_data):
    """Catches a guard that sees only the loss: a NaN gradient (finite loss) on the epoch's last step would be
    applied and saved."""
    real = swav.swav_loss
    # sqrt|s - s.detach()| adds 0 to the loss and NaN to the gradient (inf * 0 at the origin)
    monkeypatch.setattr(swav, "swav_loss", lambda scores, *a, **k: real(scores, *a, **k) +
                        (scores - scores.detach()).abs().sqrt().sum())
    with pytest.raises(SystemExit, match="gradient norm is nan at epoch 1, step 0"):
        swav.main(run_args(tmp_path, 1, "--knn-every", "0", "--batch-size", "100", data_dir=tiny_data))
    assert not (tmp_path / "checkpoint.pt").exists()

"""swav.py: Sinkhorn-Knopp against a slow loop written from the paper's Algorithm 1 and its invariants (codes
non-negative, rows summing to 1, columns to B/K), in one process and split over two gloo processes; the
swapped-prediction loss against its formula and its value at collapse (ln K); the prototypes on the unit
sphere and frozen at first; the queue (when it fills, when it is used, what it holds, that it is saved and
restored); the multi-crop batch that reaches the loss; the training script in one process and in two on the
same global batch; a checkpoint eval_linear loads; --resume bit for bit; the collapse monitors; the NaN
guards. Each test names the bug it catches."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import data
import eval_linear
import swav
import vit
from common import SAMPLE, assert_same_first_step, free_port, read_log

EPSILON = swav.get_args_parser().get_default("epsilon")  # what a run without --epsilon uses


# ---- Sinkhorn ----
def sinkhorn_slow(scores, eps, niters):
    """The paper's Algorithm 1 (its PyTorch-like pseudocode), literally, on python floats: Q = exp(scores / eps)ᵀ
    of shape K x B, normalized to sum 1; then niters times: rows scaled to r = 1/K, columns to c = 1/B; finally
    every column divided by its sum. Returns the codes as a B x K list."""
    B, K = len(scores), len(scores[0])
    Q = [[math.exp(scores[b][k] / eps) for b in range(B)] for k in range(K)]
    total = sum(map(sum, Q))
    Q = [[q / total for q in row] for row in Q]
    for _ in range(niters):
        for k in range(K):
            u = sum(Q[k])
            Q[k] = [q * (1 / K) / u for q in Q[k]]
        for b in range(B):
            col = sum(Q[k][b] for k in range(K))
            for k in range(K):
                Q[k][b] *= (1 / B) / col
    return [[Q[k][b] / sum(Q[j][b] for j in range(K)) for k in range(K)] for b in range(B)]


def random_scores(B, K, D=128, seed=0):
    """Cosines of B unit vectors with K unit prototypes, as the model produces them (D = --out-dim)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    return z @ c.T                                                                   # (B, K)


@pytest.mark.ex_swav_sinkhorn
@pytest.mark.parametrize("B,K,eps,iters", [(4, 3, 0.05, 3), (8, 5, 0.05, 1), (6, 10, 0.03, 3), (12, 4, 0.1, 5),
                                           (16, 20, 0.02, 3)])
def test_sinkhorn_matches_algorithm_1(B, K, eps, iters):
    """Catches a transposed Q, a missing or misplaced row or column normalization, epsilon in the wrong place,
    or an iteration count that is not honoured."""
    scores = random_scores(B, K, seed=B * K)
    expected = torch.tensor(sinkhorn_slow(scores.tolist(), eps, iters))
    torch.testing.assert_close(swav.sinkhorn(scores, eps, iters), expected, rtol=1e-4, atol=1e-7)


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
@pytest.mark.parametrize("B,K,spread", [(24, 6, 0.05), (16, 8, 0.1)])
def test_sinkhorn_keeps_its_precision_on_a_clustered_batch(B, K, spread):
    """Catches a Sinkhorn that exponentiates the raw scores (the reference code's exp(scores / eps)): at epsilon
    0.02 the batch's entries span e^-50 .. e^50, and after the division by their total the row of the prototype
    opposite the cluster falls below fp32's smallest number; its codes then differ from the same computation in
    float64 (the paper's Algorithm 1 on python floats) by up to 1e-2. Subtracting each prototype's largest
    score first keeps them within 1e-6, and the codes stay finite assignments."""
    scores = clustered_scores(B, K, spread)
    assert scores.max() > 0.96 and scores.min() < -0.96
    expected = torch.tensor(sinkhorn_slow(scores.double().tolist(), 0.02, 3), dtype=torch.float64)
    q = swav.sinkhorn(scores, 0.02, 3)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.ex_swav_sinkhorn
@pytest.mark.parametrize("B,K", [(64, 16), (256, 100), (96, 300)])
@pytest.mark.parametrize("eps,tol", [(0.05, 0.05), (0.02, 0.5)])  # the paper's epsilon and swav.py's default
def test_sinkhorn_codes_are_assignments_with_equipartition(B, K, eps, tol):
    """Catches codes that are not assignments (negative, rows not summing to 1), lose the equipartition
    (columns far from B/K), carry a gradient, or run in reduced precision."""
    scores = random_scores(B, K, seed=K).requires_grad_()
    q = swav.sinkhorn(scores.bfloat16(), eps, 3)
    assert q.shape == (B, K) and q.dtype == torch.float32 and not q.requires_grad
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(B))
    # 3 iterations leave the columns near, not at, B/K (a row-wise softmax is off by 40-150% at epsilon 0.05,
    # 75-370% at 0.02; 3 iterations by up to 2% and 40%); more iterations close the gap
    assert (q.sum(dim=0) - B / K).abs().max() < tol * B / K
    q = swav.sinkhorn(scores, eps, 100)
    torch.testing.assert_close(q.sum(dim=0), torch.full((K,), B / K), rtol=1e-3, atol=0)
    # and the codes still follow the scores: nearly every sample's most likely prototype among its 5 best-scored
    top5 = scores.topk(5, dim=1).indices
    assert (top5 == q.argmax(dim=1, keepdim=True)).any(dim=1).float().mean() > 0.9


def _sinkhorn_in_process(rank, world, port, scores, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    share = scores.chunk(world)[rank]                       # this process's rows of the global batch
    torch.save(swav.sinkhorn(share, 0.05, 3, distributed=True), f"{result}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.ex_swav_sinkhorn
def test_distributed_sinkhorn_equals_one_process(tmp_path):
    """Catches sums over samples that are not all-reduced (each process would balance only its own half), or
    a sample count that is this process's instead of the global one: the codes of two gloo processes, each
    holding half of the batch (as each holds its queue and its batch), are the codes of the whole batch."""
    scores = random_scores(64, 24, seed=3)
    mp.spawn(_sinkhorn_in_process, args=(2, free_port(), scores, str(tmp_path / "q")), nprocs=2, join=True)
    split = torch.cat([torch.load(f"{tmp_path / 'q'}.{r}") for r in range(2)])
    torch.testing.assert_close(split, swav.sinkhorn(scores, 0.05, 3))
    assert not torch.allclose(swav.sinkhorn(scores[:32], 0.05, 3), split[:32])   # the split matters


# ---- loss ----
def swav_loss_slow(scores, codes, tau):
    """Eq. 1-2 with the reference code's averaging: for each crop a with a code, the mean over the other crops
    v of (1/B) sum_b l(z_vb, q_ab), l = -sum_k q log softmax(z . c / tau); then the mean over the codes."""
    V, B, K = len(scores), len(scores[0]), len(scores[0][0])
    total = 0.0
    for a in range(len(codes)):
        sub = 0.0
        for v in range(V):
            if v == a:
                continue
            for b in range(B):
                norm = sum(math.exp(scores[v][b][j] / tau) for j in range(K))
                sub -= sum(codes[a][b][k] * math.log(math.exp(scores[v][b][k] / tau) / norm) for k in range(K)) / B
        total += sub / (V - 1)
    return total / len(codes)


@pytest.mark.ex_swav_loss
@pytest.mark.parametrize("V,B,K,tau", [(2, 3, 4, 0.1), (4, 5, 6, 0.1), (8, 2, 7, 0.5), (3, 4, 5, 1.0)])
def test_swav_loss_matches_the_formula(V, B, K, tau):
    """Catches a loss that lets a crop predict its own code, averages over the wrong axis, misses the
    temperature, or uses the scores' softmax where the log-softmax belongs."""
    torch.manual_seed(V * B * K)
    scores = torch.rand(V, B, K) * 2 - 1                                     # cosines
    codes = torch.softmax(torch.randn(2, B, K) * 3, dim=-1)                  # rows summing to 1
    expected = swav_loss_slow(scores.tolist(), codes.tolist(), tau)
    assert swav.swav_loss(scores, codes, tau).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.ex_swav_loss
@pytest.mark.needs_swav_sinkhorn
def test_collapse_costs_ln_k():
    """Catches a loss or Sinkhorn that misses the collapse value the docstring promises: every crop on the same
    point gives uniform codes (equipartition) and a loss of at least ln K, ln K when the prediction is uniform."""
    K = 50
    same = torch.full((4, 8, K), 0.3)                                         # every crop scores alike
    codes = torch.stack([swav.sinkhorn(same[i], 0.05, 3) for i in range(2)])
    torch.testing.assert_close(codes, torch.full((2, 8, K), 1 / K))
    assert swav.swav_loss(same, codes, 0.1).item() == pytest.approx(math.log(K), rel=1e-6)
    one_point = random_scores(1, K)[0].expand(4, 8, K)                        # one embedding for every crop
    codes = torch.stack([swav.sinkhorn(one_point[i], 0.05, 3) for i in range(2)])
    torch.testing.assert_close(codes, torch.full((2, 8, K), 1 / K))
    assert swav.swav_loss(one_point, codes, 0.1).item() > math.log(K)


# ---- training ----
def run_args(out, epochs=2, *extra, data_dir=SAMPLE):
    """A CPU-sized run on the shipped sample: 16 px global crops and 2 small crops of 8 px, patches of 8 px,
    K = 32, the queue from epoch 2 (override with a later flag)."""
    return ["--dataset", "folder", "--data-dir", data_dir, "--arch", "vit_mini", "--patch-size", "8",
            "--img-size", "16", "--small-crop-size", "8", "--num-small-crops", "2", "--epochs", str(epochs),
            "--batch-size", "128", "--warmup-epochs", "1", "--workers", "0", "--hidden-dim", "256",
            "--num-prototypes", "32", "--freeze-prototypes-epochs", "1", "--queue", "256", "--queue-start-epoch", "1",
            "--device", "cpu", "--out", str(out), *extra]


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


@pytest.mark.needs_swav_sinkhorn
def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch, tiny_data):
    """Catches a NaN loss that trains on and reaches the checkpoint."""
    monkeypatch.setattr(swav, "swav_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="loss is nan at epoch 1, step 0"):
        swav.main(run_args(tmp_path, 1, "--knn-every", "0", "--batch-size", "100", data_dir=tiny_data))
    assert not (tmp_path / "checkpoint.pt").exists()


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

"""Grades exercise 5, MoCo v3's contrastive loss, momentum encoder and forward (moco.contrastive_loss,
moco.ema_update, moco.MoCo.forward): the loss's value and gradient against Algorithm 1's ctr as a loop in float64
(with and without a queue), its collapse value and rank offsets, that it is vectorized; the exact EMA rule; the
queries and keys through exactly the modules Algorithm 1 names; a training step whose momentum encoder follows by
EMA. Instructor-only: the loop here is the answer."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import moco
import vit
from grading_checks import (assert_close_to_float64, assert_vectorized, check_ema_update, float32_bound)
from test_moco import fixed_batch_run

pytestmark = pytest.mark.ex_moco
RNG = random.Random(50)
CASES = [(2, 3, 0.2, 0), (5, 8, 0.1, 0), (8, 16, 1.0, 16), (16, 4, 0.2, 32)] + [
    (RNG.randint(2, 16), RNG.randint(2, 32), round(RNG.uniform(0.05, 1.0), 3), RNG.choice([0, 8, 40]))
    for _ in range(2)]


def ctr_slow(q, k, tau, queue=()):
    """ctr(q, k) of Algorithm 1, one query at a time, in float64 with autograd: -log of the softmax of the positive
    key (same index) over all keys of the batch and the queue, cosine similarities / tau, averaged, times 2 tau."""
    total = 0
    for i in range(len(q)):
        cos = lambda u, v: u @ v / (u.norm() * v.norm())  # noqa: E731
        candidates = [torch.exp(cos(q[i], kj) / tau) for kj in list(k) + list(queue)]
        total = total - torch.log(torch.exp(cos(q[i], k[i]) / tau) / sum(candidates))
    return total / len(q) * 2 * tau


def inputs(B, D, K):
    g = torch.Generator().manual_seed(B * D + K)
    q, k = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g) * 2
    return q, k, (F.normalize(torch.randn(K, D, generator=g), dim=1) if K else None)


def tolerance(B, D, K, tau, scale=1.0):
    # a cosine sums D products, the softmax B + K exponentials of cosines / tau (the gradient as many again);
    # the factor 2 tau scales the result
    return float32_bound(D + 2 * (B + K), scale, cond=2)


@pytest.mark.parametrize("B,D,tau,K", CASES)
def test_loss_matches_algorithm_1(B, D, tau, K):
    """Catches a wrong positive index, temperature, normalization or 2 tau factor, or a queue left out."""
    q, k, queue = inputs(B, D, K)
    got = moco.contrastive_loss(q, k, tau, queue)
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == torch.float32
    want = ctr_slow(q.double(), k.double(), tau, [] if queue is None else queue.double())
    assert_close_to_float64(got, want, tolerance(B, D, K, tau))


def test_loss_at_collapse_and_with_rank_offsets():
    """Catches a loss whose collapse value is not 2 tau ln(G + K), and a rank offset that matches a process's
    queries to another process's keys."""
    c = torch.ones(8, 16)
    want = torch.tensor(2 * 0.2 * math.log(8), dtype=torch.float64)
    assert_close_to_float64(moco.contrastive_loss(c, c, 0.2), want, tolerance(8, 16, 0, 0.2), "at collapse")
    queue = F.normalize(torch.ones(24, 16), dim=1)
    want = torch.tensor(2 * 0.2 * math.log(32), dtype=torch.float64)
    assert_close_to_float64(moco.contrastive_loss(c, c, 0.2, queue), want, tolerance(8, 16, 24, 0.2),
                            "at collapse with a queue")
    q, k, _ = inputs(8, 6, 0)
    halves = [moco.contrastive_loss(q[r * 4:(r + 1) * 4], k, 0.3, rank=r) for r in range(2)]
    assert_close_to_float64(sum(halves) / 2, ctr_slow(q.double(), k.double(), 0.3), tolerance(8, 6, 0, 0.3),
                            "two processes' halves")


@pytest.mark.parametrize("B,D,tau,K", CASES)
def test_gradient_matches_autograd_of_algorithm_1(B, D, tau, K):
    """Catches a loss that gives the queries no gradient (computed under no_grad, detached, through .item()) or
    the wrong one (a detached normalization or denominator, the 2 tau factor missing)."""
    q, k, queue = inputs(B, D, K)
    got = q.clone().requires_grad_()
    loss = moco.contrastive_loss(got, k, tau, queue)
    assert loss.requires_grad, "the loss carries no gradient"
    loss.backward()
    want = q.double().requires_grad_()
    ctr_slow(want, k.double(), tau, [] if queue is None else queue.double()).backward()
    assert got.grad is not None, "no gradient reaches the queries"
    assert_close_to_float64(got.grad, want.grad, tolerance(B, D, K, tau, want.grad.abs().max().item()),
                            "d loss / d q")


def test_loss_is_vectorized_over_the_batch():
    """Catches a Python loop over the queries: the same Python lines and torch ops at batch 8 and batch 64."""
    assert_vectorized(moco.contrastive_loss, lambda B: (*inputs(B, 16, 8)[:2], 0.2, inputs(B, 16, 8)[2]))


@pytest.mark.parametrize("m", [0.0, 1.0, 0.99, round(RNG.uniform(0.9, 0.999), 4), round(RNG.uniform(0.1, 0.9), 4)])
def test_ema_update_is_exact_and_leaves_buffers_alone(m):
    """Catches an EMA with m on the online side, an update of the online network or of the target's buffers (BN
    statistics stay its own), a copy instead of an average, a new tensor instead of an in-place update, and an
    update that autograd records."""
    check_ema_update(moco.ema_update, m)


def test_queries_and_keys_come_from_the_modules_algorithm_1_names():
    """Catches keys computed by the online projector or backbone instead of the momentum encoder's, a momentum
    branch that runs the predictor, queries that skip the predictor or go through a momentum module, and keys
    that carry a gradient. At initialization the momentum encoder equals the base encoder, so a branch built from
    the wrong modules gives the same numbers: here its weights are made different first, then the model's q and k
    must equal an explicit forward through exactly Algorithm 1's modules, q = predictor(projector(backbone(x)))
    and k = momentum_projector(momentum_backbone(x)), each view through the MLPs on its own (per-view BN)."""
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
    assert not k.requires_grad and q.requires_grad and h.requires_grad
    assert (k - k_online).abs().max() > 0.1  # the two encoders really differ here: the test can tell them apart


def test_train_one_epoch_learns_and_the_momentum_encoder_follows_by_ema():
    """Catches a step that does not train, a momentum encoder that gets gradients or the optimizer's update,
    and an EMA with the wrong weight (m on the online side, or m taken from another step)."""
    snapshots = []
    spy = lambda model: snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})  # noqa
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

"""Grades exercise 8, SwAV's swapped prediction (swav.swav_loss): its value and gradient against Eq. (1)-(2) as a
loop over crops and samples in float64, ln K at collapse, and that it is vectorized over the batch.
Instructor-only: the loop here is the answer."""
import math

import pytest
import torch

import swav
from grading_checks import assert_close_to_float64, assert_vectorized, float32_bound
from test_swav import random_scores

pytestmark = pytest.mark.ex_swav_loss
CASES = [(2, 3, 4, 0.1), (4, 5, 6, 0.1), (8, 2, 7, 0.5), (3, 4, 5, 1.0), (6, 7, 30, 0.1)]


def swav_loss_slow(scores, codes, tau):
    """Eq. 1-2 with the reference code's averaging, in float64 with autograd: for each crop a with a code, the mean
    over the other crops v of (1/B) sum_b l(z_vb, q_ab), l = -sum_k q log softmax(z . c / tau); then the mean over
    the codes."""
    V, B, K = scores.shape
    total = 0
    for a in range(len(codes)):
        sub = 0
        for v in range(V):
            if v == a:
                continue
            for b in range(B):
                norm = sum(torch.exp(scores[v, b, j] / tau) for j in range(K))
                sub = sub - sum(codes[a, b, k] * torch.log(torch.exp(scores[v, b, k] / tau) / norm)
                                for k in range(K)) / B
        total = total + sub / (V - 1)
    return total / len(codes)


def inputs(V, B, K):
    g = torch.Generator().manual_seed(V * B * K)
    scores = torch.rand(V, B, K, generator=g) * 2 - 1                                  # cosines
    codes = torch.softmax(torch.randn(2, B, K, generator=g) * 3, dim=-1)               # rows summing to 1
    return scores, codes


def tolerance(K, tau, scale=1.0):
    # a softmax over K scores / tau (and a code's K products with its logarithm)
    return float32_bound(2 * K, scale, cond=1 / tau)


@pytest.mark.parametrize("V,B,K,tau", CASES)
def test_value_matches_the_formula(V, B, K, tau):
    """Catches a loss that lets a crop predict its own code, averages over the wrong axis, misses the
    temperature, or uses the scores' softmax where the log-softmax belongs."""
    scores, codes = inputs(V, B, K)
    got = swav.swav_loss(scores, codes, tau)
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == torch.float32
    assert_close_to_float64(got, swav_loss_slow(scores.double(), codes.double(), tau), tolerance(K, tau))


@pytest.mark.parametrize("V,B,K,tau", CASES)
def test_gradient_matches_autograd_of_the_formula(V, B, K, tau):
    """Catches a loss that gives the scores no gradient (no_grad, detached, .item()) or the wrong one (a detached
    normalization, a wrong average)."""
    scores, codes = inputs(V, B, K)
    got = scores.clone().requires_grad_()
    loss = swav.swav_loss(got, codes, tau)
    assert loss.requires_grad, "the loss carries no gradient"
    loss.backward()
    want = scores.double().requires_grad_()
    swav_loss_slow(want, codes.double(), tau).backward()
    assert got.grad is not None, "no gradient reaches the scores"
    assert_close_to_float64(got.grad, want.grad, tolerance(K, tau, want.grad.abs().max().item()), "d loss / d scores")


def test_is_vectorized_over_the_batch():
    """Catches a Python loop over the samples: the same Python lines and torch ops at batch 8 and batch 64 (a loop
    over the crops is the reference code's, and allowed)."""
    assert_vectorized(swav.swav_loss, lambda B: (*inputs(4, B, 10), 0.1))


def test_collapse_costs_ln_k():
    """Catches a loss that misses the collapse value: every crop on the same point gets uniform codes
    (equipartition), and the loss is ln K when the prediction is uniform too, more when it is not."""
    K = 50
    uniform = torch.full((2, 8, K), 1 / K)
    got = swav.swav_loss(torch.full((4, 8, K), 0.3), uniform, 0.1)
    assert_close_to_float64(got, torch.tensor(math.log(K), dtype=torch.float64), tolerance(K, 0.1), "at collapse")
    one_point = random_scores(1, K)[0].expand(4, 8, K)                        # one embedding for every crop
    assert swav.swav_loss(one_point, uniform, 0.1).item() > math.log(K)

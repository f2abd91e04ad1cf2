"""Grades exercise 3, NT-Xent vectorized (simclr.nt_xent_loss): its value and its gradient against SimCLR's
Algorithm 1 written as a loop in float64, known values, a batch split over processes by rank, and that it is
vectorized (no Python loop over the batch). Instructor-only: the slow loop here is exercise 2's answer."""
import math
import random

import pytest
import torch

import simclr
from grading_checks import assert_close_to_float64, assert_vectorized, float32_bound

pytestmark = pytest.mark.ex_simclr_loss
RNG = random.Random(30)
CASES = [(2, 3, 0.5), (5, 8, 0.1), (8, 16, 1.0), (16, 4, 0.2)] + [
    (RNG.randint(2, 16), RNG.randint(2, 32), round(RNG.uniform(0.05, 1.0), 3)) for _ in range(3)]


def nt_xent_slow(z1, z2, tau):
    """Algorithm 1, literally, in float64 with autograd: z_{2k-1}, z_{2k} are the two views of image k, and
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)] with l(i, j) = -log( exp(sim(z_i, z_j)/tau) /
    sum_{k != i} exp(sim(z_i, z_k)/tau) ), sim the cosine. Returns a 0-dim float64 tensor."""
    z = []
    for a, b in zip(z1.double(), z2.double()):
        z += [a, b]
    n = len(z)  # 2N in the paper's notation

    def sim(u, v):
        return u @ v / (u.norm() * v.norm())

    def l(i, j):
        denom = sum(torch.exp(sim(z[i], z[k]) / tau) for k in range(n) if k != i)
        return -torch.log(torch.exp(sim(z[i], z[j]) / tau) / denom)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n // 2)) / n


def inputs(B, D):
    g = torch.Generator().manual_seed(1000 * B + D)
    return torch.randn(B, D, generator=g) * 3, torch.randn(B, D, generator=g)  # not normalized, not alike in scale


def tolerance(B, D, tau, scale=1.0):
    # a cosine sums D products, the softmax 2B exponentials of cosines / tau (and the gradient 2B more terms)
    return float32_bound(D + 4 * B, scale, cond=1 / tau)


@pytest.mark.parametrize("B,D,tau", CASES)
def test_value_matches_algorithm_1(B, D, tau):
    """Catches a wrong self-mask, temperature, normalization or partner index, or a mean over B instead of the 2B
    anchors."""
    z1, z2 = inputs(B, D)
    got = simclr.nt_xent_loss(z1, z2, tau)
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == torch.float32
    assert_close_to_float64(got, nt_xent_slow(z1, z2, tau), tolerance(B, D, tau))


@pytest.mark.parametrize("B,tau", [(4, 0.5), (8, 0.1)])
def test_value_at_collapse_and_for_orthogonal_images(B, tau):
    """Catches a loss that depends on the embeddings' scale or misses ln(2B-1) at collapse."""
    z = torch.eye(16)[:B] * 3.0  # identical views of orthogonal embeddings: partner cosine 1, the rest 0
    want = torch.tensor(math.log(1 + (2 * B - 2) * math.exp(-1 / tau)), dtype=torch.float64)
    assert_close_to_float64(simclr.nt_xent_loss(z, z, tau), want, tolerance(B, 16, tau))
    c = torch.ones(B, 16)  # collapse: uniform over the 2B-1 candidates
    want = torch.tensor(math.log(2 * B - 1), dtype=torch.float64)
    assert_close_to_float64(simclr.nt_xent_loss(c, c, tau), want, tolerance(B, 16, tau), "at collapse")


@pytest.mark.parametrize("B,D,tau", CASES)
def test_gradient_matches_autograd_of_algorithm_1(B, D, tau):
    """Catches a loss that gives no gradient (computed under no_grad, detached, or through .item()), or the wrong
    one: a detached denominator or normalization, a gradient into one view only."""
    z1, z2 = inputs(B, D)
    got = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    loss = simclr.nt_xent_loss(*got, tau)
    assert loss.requires_grad, "the loss carries no gradient"
    loss.backward()
    want = [z1.double().requires_grad_(), z2.double().requires_grad_()]
    nt_xent_slow(*want, tau).backward()
    for name, g, w in zip(("z1", "z2"), got, want):
        assert g.grad is not None, f"no gradient reaches {name}"
        assert_close_to_float64(g.grad, w.grad, tolerance(B, D, tau, w.grad.abs().max().item()), f"d loss / d {name}")


def test_is_vectorized_over_the_batch():
    """Catches a Python loop over the anchors or the images (exercise 2's loop inside exercise 3): the same
    Python lines and torch ops at batch 8 and batch 64 (course/grading/grading_checks.py)."""
    assert_vectorized(simclr.nt_xent_loss, lambda B: (*inputs(B, 16), 0.5))


def test_rank_offset_loss_equals_whole_batch_loss():
    """Catches a rank offset that puts a process's positives or self-mask at another process's images: two
    processes' halves (each its own anchors against all candidates) average to the whole batch's loss, and their
    gradients sum to its gradient."""
    z1, z2 = inputs(8, 6)
    whole = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    loss = simclr.nt_xent_loss(*whole, 0.3)
    loss.backward()
    split = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    halves = [simclr.nt_xent_loss(split[0][r * 4:(r + 1) * 4], split[1][r * 4:(r + 1) * 4], 0.3, *split, rank=r)
              for r in range(2)]
    (sum(halves) / 2).backward()
    tol = tolerance(8, 6, 0.3)
    assert_close_to_float64(sum(halves) / 2, loss.double(), tol, "the halves' mean")
    for w, s in zip(whole, split):
        assert_close_to_float64(s.grad, w.grad.double(), tolerance(8, 6, 0.3, w.grad.abs().max().item()), "gradient")

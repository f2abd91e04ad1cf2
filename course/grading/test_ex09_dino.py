"""Grades exercise 9, DINO's loss, centre and teacher update (dino.dino_loss, dino.update_center, dino.ema_update):
the loss's value and gradient against Algorithm 1 as a loop in float64, its pairs, its value at the defaults'
sizes, its values at collapse and the sharpening it needs, that loss and centre are vectorized; the centre's EMA
of the teacher's batch mean; the teacher's exact EMA. Instructor-only: the loops here are the answer."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import dino
from grading_checks import assert_close_to_float64, assert_vectorized, check_ema_update, float32_bound

pytestmark = pytest.mark.ex_dino
RNG = random.Random(90)
CASES = [(2, 3, 4, 0.1, 0.04), (4, 5, 6, 0.1, 0.07), (10, 2, 7, 0.1, 0.04), (3, 4, 5, 0.5, 0.2)]


def dino_loss_slow(student, teacher, center, tau_s, tau_t):
    """Algorithm 1, literally, in float64 with autograd: H(t, s) = -sum_k softmax((t - C) / tpt)_k log
    softmax(s / tps)_k, averaged over the batch, for each pair (teacher's global crop i, student's crop j), j != i;
    then the mean over the pairs (for V = 2: H(t1, s2) / 2 + H(t2, s1) / 2)."""
    V, B, K = student.shape
    total, pairs = 0, 0
    for i in range(2):
        for j in range(V):
            if j == i:
                continue
            h = 0
            for b in range(B):
                tq = [torch.exp((teacher[i, b, k] - center[k]) / tau_t) for k in range(K)]
                sp = [torch.exp(student[j, b, k] / tau_s) for k in range(K)]
                h = h - sum(tq[k] / sum(tq) * torch.log(sp[k] / sum(sp)) for k in range(K)) / B
            total, pairs = total + h, pairs + 1
    return total / pairs


def inputs(V, B, K):
    g = torch.Generator().manual_seed(V * B * K)
    student, teacher = torch.rand(V, B, K, generator=g) * 2 - 1, torch.rand(2, B, K, generator=g) * 2 - 1  # cosines
    return student, teacher, torch.randn(K, generator=g) * 0.3


def tolerance(K, tau_s, tau_t, scale=1.0):
    # two softmaxes over K logits, the student's amplified by 1 / tau_s, the teacher's by 1 / tau_t
    return float32_bound(2 * K, scale, cond=1 / tau_s + 1 / tau_t)


@pytest.mark.parametrize("V,B,K,tau_s,tau_t", CASES)
def test_loss_matches_algorithm_1(V, B, K, tau_s, tau_t):
    """Catches a loss that lets a crop predict itself, misses a pair or the small crops, averages over the wrong
    axis, swaps or drops a temperature, forgets the centre (or adds it to the student), or puts a softmax where
    the log-softmax belongs; the centre may be (K,) or (1, K)."""
    student, teacher, center = inputs(V, B, K)
    want = dino_loss_slow(student.double(), teacher.double(), center.double(), tau_s, tau_t)
    for c in (center, center[None]):
        got = dino.dino_loss(student, teacher, c, tau_s, tau_t)
        assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == torch.float32
        assert_close_to_float64(got, want, tolerance(K, tau_s, tau_t))


@pytest.mark.parametrize("outputs", ["uniform", "random"])
def test_loss_value_is_float64s_at_the_default_sizes(outputs):
    """Catches a loss whose value (what the log and the kl monitor show) adds all B*K products of a pair in one
    float32 dot product (one einsum over b and k): at the defaults' sizes (V = 10 crops, B = 512, K = 4096) uniform
    outputs then cost 8.31205 instead of ln K = 8.31777. Reference: the same formula in float64, pair by pair.
    Tolerance from float32's error bound, not from one CPU: a cascade (pairwise) sum of n terms, torch's CPU sum
    and CUDA's tree reduction alike, errs by about log2(n) roundings (u = 6e-8) of the sum of magnitudes; over
    K, B and the 18 pairs that is (12 + 9 + 5) u = 1.6e-6 of the value (measured: 1e-7)."""
    V, B, K = 10, 512, 4096
    torch.manual_seed(0)
    s, t = (torch.zeros(V, B, K), torch.zeros(2, B, K)) if outputs == "uniform" else \
        (torch.randn(V, B, K), torch.randn(2, B, K))
    c = torch.randn(K) * 0.1
    log_p = F.log_softmax(s.double() / 0.1, dim=-1)
    q = F.softmax((t.double() - c.double()) / 0.04, dim=-1)
    pairs = [(-(q[i] * log_p[v]).sum(-1)).mean() for i in range(2) for v in range(V) if v != i]
    expected = torch.stack(pairs).mean().item()
    assert dino.dino_loss(s, t, c, 0.1, 0.04).item() == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("V,B,K,tau_s,tau_t", CASES)
def test_gradient_matches_autograd_of_algorithm_1(V, B, K, tau_s, tau_t):
    """Catches a loss that gives the student no gradient (no_grad, detached, .item()) or the wrong one, and a
    teacher output that gets a gradient (no stop-gradient, sg in Algorithm 1)."""
    student, teacher, center = inputs(V, B, K)
    got, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = dino.dino_loss(got, t, center, tau_s, tau_t)
    assert loss.requires_grad, "the loss carries no gradient"
    loss.backward()
    assert t.grad is None, "the teacher's output gets a gradient: no stop-gradient"
    want = student.double().requires_grad_()
    dino_loss_slow(want, teacher.double(), center.double(), tau_s, tau_t).backward()
    assert got.grad is not None, "no gradient reaches the student"
    assert_close_to_float64(got.grad, want.grad, tolerance(K, tau_s, tau_t, want.grad.abs().max().item()),
                            "d loss / d student")


def test_loss_and_centre_are_vectorized_over_the_batch():
    """Catches a Python loop over the samples in the loss or the centre: the same Python lines and torch ops at
    batch 8 and batch 64 (a loop over the 2 teacher crops or the V student crops is allowed)."""
    assert_vectorized(dino.dino_loss, lambda B: (*inputs(4, B, 10), 0.1, 0.04))
    assert_vectorized(dino.update_center, lambda B: (torch.zeros(10), torch.randn(2, B, 10), 0.9))


def test_collapse_values_and_sharpening():
    """Catches a loss that misses the values the docstring promises, uniform outputs cost ln K (uniform
    collapse), one dimension for every image about 0 (one-dimension collapse); and a teacher as warm as the
    student (no sharpening): where the student already outputs the teacher's logits, equal temperatures leave
    nothing to learn (zero gradient), while a colder teacher still pushes the student to a lower entropy."""
    K = 50
    got = dino.dino_loss(torch.zeros(4, 8, K), torch.zeros(2, 8, K), torch.zeros(K), 0.1, 0.04)
    assert_close_to_float64(got, torch.tensor(math.log(K), dtype=torch.float64), tolerance(K, 0.1, 0.04), "uniform")
    one = torch.zeros(K).index_fill_(0, torch.tensor([3]), 1.0)                 # cosine 1 with one output row
    loss = dino.dino_loss(one.expand(4, 8, K), one.expand(2, 8, K), torch.zeros(K), 0.1, 0.04)
    assert 0 < loss.item() < 0.01
    torch.manual_seed(0)
    z = torch.randn(1, 16, 32) * 0.3
    entropy = lambda s: -(F.softmax(s / 0.1, -1) * F.log_softmax(s / 0.1, -1)).sum(-1).mean()  # noqa: E731
    for tau_t, sharpens in ((0.1, False), (0.04, True)):
        s = z.expand(2, 16, 32).clone().requires_grad_()
        dino.dino_loss(s, z.expand(2, 16, 32), torch.zeros(32), 0.1, tau_t).backward()
        if not sharpens:
            assert s.grad.abs().max() < 1e-6
        else:
            assert s.grad.abs().max() > 1e-3 and entropy(s.detach() - 0.5 * s.grad) < entropy(s.detach()) - 0.01


@pytest.mark.parametrize("B,K,m", [(4, 6, 0.9)] + [
    (RNG.randint(1, 16), RNG.randint(2, 64), round(RNG.uniform(0.5, 0.999), 4)) for _ in range(3)])
def test_center_is_an_ema_of_the_teachers_batch_mean(B, K, m):
    """Catches a centre that averages over one crop or the wrong axis, puts m on the new mean, is not updated in
    place, or is recorded by autograd: c <- m c + (1 - m) mean over both global crops and the batch (Eq. 4)."""
    g = torch.Generator().manual_seed(B * K)
    teacher, center = torch.randn(2, B, K, generator=g).requires_grad_(), torch.randn(K, generator=g)
    before, ref = center.clone(), center
    slow = [m * before[k].item() + (1 - m) * sum(teacher[i, b, k].item() for i in range(2) for b in range(B)) / (2 * B)
            for k in range(K)]
    dino.update_center(center, teacher, m)
    assert center is ref and center.shape == (K,) and not center.requires_grad
    scale = before.abs().max().item() + teacher.abs().max().item()
    assert_close_to_float64(center, torch.tensor(slow, dtype=torch.float64), float32_bound(2 * B + 3, scale),
                            "the centre")


@pytest.mark.parametrize("m", [0.0, 1.0, 0.996, round(RNG.uniform(0.9, 0.999), 4), round(RNG.uniform(0.1, 0.9), 4)])
def test_teacher_ema_update_is_exact_and_leaves_buffers_alone(m):
    """Catches a teacher update with l on the student's side, an update of the student or of the teacher's
    buffers, a copy instead of an average, a new tensor instead of an in-place update, and an update that
    autograd records."""
    check_ema_update(dino.ema_update, m)

"""Grades exercise 2, NT-Xent as a loop (course/naive.py nt_xent_loss_naive): its value against SimCLR's Algorithm 1
written independently (course/grading/test_ex03_simclr_loss.py's float64 loop) and at collapse. Instructor-only."""
import importlib.util
import math
import os
import random

import pytest
import torch

from grading_checks import assert_close_to_float64, float32_bound
from test_ex03_simclr_loss import nt_xent_slow

pytestmark = pytest.mark.ex_simclr_loss_naive
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("course_naive", os.path.join(ROOT, "course", "naive.py"))
naive = importlib.util.module_from_spec(spec)
spec.loader.exec_module(naive)
RNG = random.Random(20)


@pytest.mark.parametrize("B,D,tau", [(2, 3, 0.5), (1, 4, 0.1)] + [
    (RNG.randint(2, 12), RNG.randint(2, 32), round(RNG.uniform(0.05, 1.0), 3)) for _ in range(4)])
def test_value_matches_algorithm_1(B, D, tau):
    """Catches a loop with a wrong partner, a self-similarity left in the denominator, a missing normalization or
    temperature, or the mean over B instead of 2B anchors."""
    g = torch.Generator().manual_seed(1000 * B + D)
    z1, z2 = torch.randn(B, D, generator=g) * 3, torch.randn(B, D, generator=g)
    got = naive.nt_xent_loss_naive(z1, z2, tau)
    assert isinstance(got, torch.Tensor) and got.dim() == 0
    assert_close_to_float64(got, nt_xent_slow(z1, z2, tau), float32_bound(D + 2 * B, 1.0, cond=1 / tau))


@pytest.mark.parametrize("B", [1, 4, 9])
def test_value_at_collapse(B):
    """Catches a denominator that does not run over the 2B - 1 other views: with every view equal the partner is
    one of 2B - 1 equal candidates, ln(2B - 1)."""
    c = torch.ones(B, 8)
    want = torch.tensor(math.log(max(1, 2 * B - 1)), dtype=torch.float64)
    assert_close_to_float64(naive.nt_xent_loss_naive(c, c, 0.5), want, float32_bound(8 + 2 * B, 1.0, cond=2))

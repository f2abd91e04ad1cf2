"""What the grading tests share: a tolerance from float32's error bound, and the check that a function is
vectorized over the batch.

Tolerances. A float32 result is compared with the same formula computed as a slow loop in float64 (whose own error
is ~1e-16, nothing next to float32's). Float32 rounds every operation to a relative error of at most
u = 2^-24 = 6.0e-8; a sum or dot product of n terms, in any order (a loop, a cascade, a GPU tree), errs by at most
n u times the sum of the terms' magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, §4.2). A
loss whose logits are cosines / tau adds the 1 / tau amplification. So `float32_bound(n, scale, cond)` =
n u cond scale, with n the longest chain of sums the computation makes and scale the size of the result, is a
bound every correct float32 implementation keeps on every CPU and GPU, while a wrong formula (a missed factor,
term, pair or gradient) is off by far more. The tests use 4x that bound (a few roundings more than the sums:
exp, log, the normalization, the division by the mean's count).

Vectorized. `assert_vectorized` runs a function at two batch sizes and counts the Python lines it executes
(sys.settrace, every frame it calls, torch's own Python included) and the ATen operations it dispatches (a
TorchDispatchMode). Vectorized code does the same work in the same number of lines and ops at any batch size; a
Python loop over the samples, or over pairs of samples, executes at least one more line per sample. Counting is
exact and independent of the machine's speed or load, unlike timing.
"""
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

U = 2.0 ** -24  # float32's unit roundoff


def float32_bound(n, scale, cond=1.0):
    """4 n u cond scale: the tolerance of a float32 result of size `scale` made by sums of at most n terms, its
    inputs amplified by `cond` (see the module docstring)."""
    return 4 * n * U * cond * scale


def assert_close_to_float64(got, want, tol, what="value"):
    """got (float32, any shape) against want (float64, the slow reference): every entry within tol (a
    float32_bound); the message says by how much it missed."""
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = (got - want).abs().max().item()
    assert err <= tol, (f"{what}: off by {err:.3g} (float32 allows {tol:.3g}); expected "
                        f"{[round(x, 6) for x in want.flatten()[:3].tolist()]}..., got "
                        f"{[round(x, 6) for x in got.flatten()[:3].tolist()]}...")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def cost(fn, *args):
    """(Python lines executed, ATen ops dispatched) by fn(*args)."""
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return trace

    counter = _CountOps()
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        with counter:
            fn(*args)
    finally:
        sys.settrace(previous)
    return lines, counter.ops


def assert_vectorized(fn, make_args, small=8, large=64):
    """fn(*make_args(B)) executes as many Python lines and ATen ops at B = large as at B = small (up to 8 more,
    for a data-dependent branch; a loop over the batch adds at least large - small = 56)."""
    for B in (small, large):  # first calls import and cache what later calls reuse
        fn(*make_args(B))
    (lines_s, ops_s), (lines_l, ops_l) = cost(fn, *make_args(small)), cost(fn, *make_args(large))
    assert lines_l - lines_s <= 8 and ops_l - ops_s <= 8, (
        f"not vectorized over the batch: {lines_s} Python lines and {ops_s} torch ops at B = {small}, "
        f"{lines_l} and {ops_l} at B = {large} (a loop over the samples?)")


def two_networks(seed):
    """A small online network and a target that differs from it, with BatchNorm buffers that differ too."""
    torch.manual_seed(seed)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))  # noqa
    online, target = make(), make().requires_grad_(False)
    online(torch.randn(16, 5))  # online's BN running statistics move; the target's stay at their init
    return online, target


def check_ema_update(ema_update, m):
    """ema_update(target, online, m) moves every target parameter to m target + (1 - m) online (float64 reference,
    float32's bound for two products and a sum), in place, unrecorded by autograd, and touches neither the
    target's buffers nor anything of the online network."""
    online, target = two_networks(seed=int(m * 1000))
    online_before = {k: v.clone() for k, v in online.state_dict().items()}
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    params_before = [p for p in target.parameters()]
    with torch.enable_grad():
        ema_update(target, online, m)
    for (name, t), o, same in zip(target.named_parameters(), online.parameters(), params_before):
        want = m * target_before[name].double() + (1 - m) * online_before[name].double()
        scale = (target_before[name].abs() + online_before[name].abs()).max().item()
        assert_close_to_float64(t, want, float32_bound(3, scale), f"target parameter {name}")
        assert t is same, f"{name} replaced, not updated in place"
        assert t.grad_fn is None and not t.requires_grad and o.grad is None, f"{name}: recorded by autograd"
    for name, b in target.named_buffers():
        assert torch.equal(b, target_before[name]), f"the target's buffer {name} changed"
    for name, v in online.state_dict().items():
        assert torch.equal(v, online_before[name]), f"the online network's {name} changed"

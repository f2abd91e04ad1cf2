"""Grades exercise 7, SwAV's Sinkhorn-Knopp codes (swav.sinkhorn): against the paper's Algorithm 1 on Python floats,
precision on a clustered batch (max-subtraction), codes that are assignments with equipartition and no gradient,
that it is vectorized over the batch, and two gloo processes equal to one. Instructor-only: the loop here is the
answer."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import swav
from common import free_port
from grading_checks import assert_close_to_float64, assert_vectorized, float32_bound
from test_swav import clustered_scores, random_scores

pytestmark = pytest.mark.ex_swav_sinkhorn


def sinkhorn_slow(scores, eps, niters):
    """The paper's Algorithm 1 (its PyTorch-like pseudocode), literally, on python floats: Q = exp(scores / eps)ᵀ
    of shape K x B, normalized to sum 1; then niters times: rows scaled to r = 1/K, columns to c = 1/B; finally
    every column divided by its sum. Returns the codes as a B x K float64 tensor."""
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
    return torch.tensor([[Q[k][b] / sum(Q[j][b] for j in range(K)) for k in range(K)] for b in range(B)],
                        dtype=torch.float64)


def tolerance(B, K, eps, iters):
    # exp of a float32 argument up to 2 / eps errs by 2 / eps roundings (relative); every iteration sums B and K
    # terms; the codes are at most 1
    return float32_bound(2 / eps + (iters + 1) * (B + K), 1.0)


@pytest.mark.parametrize("B,K,eps,iters", [(4, 3, 0.05, 3), (8, 5, 0.05, 1), (6, 10, 0.03, 3), (12, 4, 0.1, 5),
                                           (16, 20, 0.02, 3)])
def test_codes_match_algorithm_1(B, K, eps, iters):
    """Catches a transposed Q, a missing or misplaced row or column normalization, epsilon in the wrong place,
    or an iteration count that is not honoured."""
    scores = random_scores(B, K, seed=B * K)
    got = swav.sinkhorn(scores, eps, iters)
    assert_close_to_float64(got, sinkhorn_slow(scores.tolist(), eps, iters), tolerance(B, K, eps, iters), "codes")


@pytest.mark.parametrize("B,K,spread", [(24, 6, 0.05), (16, 8, 0.1)])
def test_precision_on_a_clustered_batch(B, K, spread):
    """Catches a Sinkhorn that exponentiates the raw scores (the reference code's exp(scores / eps)): at epsilon
    0.02 the batch's entries span e^-50 .. e^50, and after the division by their total the row of the prototype
    opposite the cluster falls below fp32's smallest number; its codes then differ from the same computation in
    float64 (the paper's Algorithm 1 on python floats) by up to 1e-2. Subtracting each prototype's largest
    score first keeps them within float32's bound, and the codes stay finite assignments."""
    scores = clustered_scores(B, K, spread)
    assert scores.max() > 0.96 and scores.min() < -0.96
    q = swav.sinkhorn(scores, 0.02, 3)
    assert torch.isfinite(q).all() and (q >= 0).all()
    assert_close_to_float64(q, sinkhorn_slow(scores.double().tolist(), 0.02, 3), tolerance(B, K, 0.02, 3), "codes")


@pytest.mark.parametrize("B,K", [(64, 16), (256, 100), (96, 300)])
@pytest.mark.parametrize("eps,tol", [(0.05, 0.05), (0.02, 0.5)])  # the paper's epsilon and swav.py's default
def test_codes_are_assignments_with_equipartition(B, K, eps, tol):
    """Catches codes that are not assignments (negative, rows not summing to 1), lose the equipartition
    (columns far from B/K), carry a gradient, or run in reduced precision; and a collapsed batch (every sample
    on one point) whose codes are not uniform."""
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
    # collapse: every sample scores alike, the codes spread it uniformly over the prototypes
    same = random_scores(1, K)[0].expand(B, K)
    torch.testing.assert_close(swav.sinkhorn(same, eps, 3), torch.full((B, K), 1 / K))


def test_is_vectorized_over_the_batch():
    """Catches a Python loop over the samples or prototypes: the same Python lines and torch ops at batch 8 and
    batch 64 (iterations loop, the batch does not)."""
    assert_vectorized(swav.sinkhorn, lambda B: (random_scores(B, 20, seed=B), 0.05, 3))


def _sinkhorn_in_process(rank, world, port, scores, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    share = scores.chunk(world)[rank]                       # this process's rows of the global batch
    torch.save(swav.sinkhorn(share, 0.05, 3, distributed=True), f"{result}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    """Catches sums over samples that are not all-reduced (each process would balance only its own half), or
    a sample count that is this process's instead of the global one: the codes of two gloo processes, each
    holding half of the batch (as each holds its queue and its batch), are the codes of the whole batch."""
    scores = random_scores(64, 24, seed=3)
    mp.spawn(_sinkhorn_in_process, args=(2, free_port(), scores, str(tmp_path / "q")), nprocs=2, join=True)
    split = torch.cat([torch.load(f"{tmp_path / 'q'}.{r}") for r in range(2)])
    torch.testing.assert_close(split, swav.sinkhorn(scores, 0.05, 3))
    assert not torch.allclose(swav.sinkhorn(scores[:32], 0.05, 3), split[:32])   # the split matters

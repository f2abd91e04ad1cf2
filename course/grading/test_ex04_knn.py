"""Grades exercise 4, the weighted k-NN classifier (eval_linear.knn_classify): its class scores against a slow
loop over test points written from InstDisc §3.4 / DINO's eval_knn.py, hand-computed cases where the weights beat
the majority and classes without a vote get no credit, and that it is vectorized over the test points.
Instructor-only: the slow loop here is the answer."""
import math

import pytest
import torch
import torch.nn.functional as F

import eval_linear
from grading_checks import assert_close_to_float64, assert_vectorized, float32_bound

pytestmark = pytest.mark.ex_knn


def slow_knn_scores(train, train_labels, test, num_classes, k, temperature):
    """Per test sample, as the paper describes it: cosine similarity to every train sample, sort, keep the
    k most similar, each adds exp(sim / T) to its class; a class without a vote scores -inf."""
    scores = torch.full((len(test), num_classes), float("-inf"), dtype=torch.float64)
    for i, x in enumerate(test.double()):
        sims = [(F.cosine_similarity(x, t.double(), dim=0).item(), int(y)) for t, y in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        for sim, y in sims[:k]:
            scores[i, y] = max(scores[i, y], 0) + math.exp(sim / temperature)
    return scores


def assert_scores_close(got, want, dim, k, temperature):
    """The same classes without a vote (-inf), the others within float32's bound: a cosine sums dim products, its
    error amplified by 1 / T in exp(s / T), and a class adds up to k weights."""
    assert got.shape == want.shape, f"scores of shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "not -inf exactly where no neighbour voted"
    voted = ~torch.isneginf(want)
    assert_close_to_float64(got[voted], want[voted], float32_bound(dim + k, want[voted].abs().max().item(),
                                                                   cond=1 / temperature), "class scores")


@pytest.mark.parametrize("n_train,n_test,dim,classes,k,temperature", [
    (50, 7, 8, 3, 1, 0.07), (50, 7, 8, 3, 5, 0.5), (200, 33, 16, 10, 20, 0.07),
    (120, 5, 4, 4, 10, 1.0), (9, 4, 6, 3, 20, 0.1),  # k > n_train: all train samples vote
])
def test_scores_match_a_slow_loop(n_train, n_test, dim, classes, k, temperature):
    """Catches a wrong similarity, neighbour count, weight exp(s/T) or class accumulation, chunks that lose or
    repeat test rows, and a similarity that depends on the features' scale."""
    g = torch.Generator().manual_seed(n_train + k)
    train, test = torch.randn(n_train, dim, generator=g), torch.randn(n_test, dim, generator=g)
    train_labels = torch.randint(classes, (n_train,), generator=g)
    slow = slow_knn_scores(train, train_labels, test, classes, k, temperature)
    for chunk_size in (3, 256):
        fast = eval_linear.knn_classify(train, train_labels, test, classes, k, temperature, chunk_size=chunk_size)
        assert_scores_close(fast, slow, dim, k, temperature)
    # cosine: invariant to the scale of either side
    assert_scores_close(eval_linear.knn_classify(3 * train, train_labels, 0.5 * test, classes, k, temperature), slow,
                        dim, k, temperature)


def test_hand_computed_weights_beat_the_majority():
    """Catches uniform votes (a majority vote) instead of the exp(s / T) weights."""
    # test point (1, 0); one class-1 neighbour at cos 1, two class-0 neighbours at cos 0.5, one far class-2 point
    train = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.5, -math.sqrt(3) / 2], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    test = torch.tensor([[2.0, 0.0]])
    scores = eval_linear.knn_classify(train, labels, test, num_classes=3, k=3, temperature=0.1)
    # class 1: e^(1/0.1) = 22026.5; class 0: 2 e^(0.5/0.1) = 296.8; class 2 is not among the 3 nearest
    torch.testing.assert_close(scores, torch.tensor([[2 * math.exp(5.0), math.exp(10.0), float("-inf")]]))
    assert eval_linear.knn_accuracy(train, labels, test, torch.tensor([1]), 3, k=3, temperature=0.1) == (100.0, 100.0)
    # with a high temperature the weights flatten towards a majority vote: class 0 wins
    assert eval_linear.knn_classify(train, labels, test, 3, k=3, temperature=100.0).argmax().item() == 0


def test_top5_gives_no_credit_to_classes_without_a_vote():
    """Catches a top-5 that counts a class no neighbour voted for (ties among zero scores broken by index)."""
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([5, 5, 6])                  # 10 classes; 0-4 and 7-9 never occur in train
    test = torch.tensor([[1.0, 0.05], [1.0, 0.0]])
    # k=2: both neighbours are class 5; test labels 0 (lowest index: topk's tie-break favours it) and 5
    top1, top5 = eval_linear.knn_accuracy(train, labels, test, torch.tensor([0, 5]), 10, k=2)
    assert (top1, top5) == (50.0, 50.0)


def test_is_vectorized_over_the_test_points():
    """Catches a Python loop over the test points or their neighbours: the same Python lines and torch ops for 8
    and 64 test points (one chunk each; course/grading/grading_checks.py)."""
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(300, 16, generator=g), torch.randint(10, (300,), generator=g)
    assert_vectorized(eval_linear.knn_classify,
                      lambda M: (train, labels, torch.randn(M, 16, generator=g), 10, 20, 0.07, 256))

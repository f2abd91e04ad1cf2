"""Exercise 2 of the course (course/README.md): NT-Xent written as a loop, one anchor at a time, before the
vectorized simclr.nt_xent_loss of exercise 3. Not used by any training script.

Paper: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, https://arxiv.org/abs/2002.05709, §2.1 and Algorithm 1.
"""
import math

import torch


def nt_xent_loss_naive(z1, z2, temperature):
    """NT-Xent of SimCLR's Algorithm 1 with Python loops, one anchor and one candidate at a time (no matrix of
    similarities): the value simclr.nt_xent_loss(z1, z2, temperature) returns in one process.

    z1, z2: (B, D) float tensors, the projections of two views of the same B images (row b of z1 and row b of
        z2 are the positive pair of image b); they are not normalized. temperature: tau > 0.
    Returns a 0-dim float tensor: the mean over all 2B views i (each view of each image is an anchor once) of
        l(i) = -log( exp(sim(i, p(i)) / tau) / sum_{k != i} exp(sim(i, k) / tau) ),
    where sim(u, v) = u . v / (|u| |v|) is the cosine similarity, p(i) is i's other view of the same image and
    k runs over the 2B - 1 views other than i itself (2B - 2 negatives and the positive). A check of the formula,
    not a training loss: the value carries no gradient.
    """
    views = list(z1) + list(z2)                              # 2B views: image b's two views are b and b + B
    n = len(views)
    total = 0.0
    for i in range(n):
        partner = (i + n // 2) % n

        def sim(k):
            u, v = views[i], views[k]
            return (u @ v / (u.norm() * v.norm())).item()

        denominator = sum(math.exp(sim(k) / temperature) for k in range(n) if k != i)
        total += -math.log(math.exp(sim(partner) / temperature) / denominator)
    return torch.tensor(total / n)

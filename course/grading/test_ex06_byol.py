"""Grades exercise 6, BYOL's loss, target network and forward (byol.byol_loss, byol.ema_update, byol.BYOL.forward):
the loss's value and gradient against eq. 2 written per sample in float64, its range and fixed points, that it is
vectorized; the exact EMA rule; predictions and targets through exactly the modules the paper names; a training
step that learns while the target follows by EMA. Instructor-only."""
import random

import pytest
import torch

import byol
import vit
from grading_checks import assert_close_to_float64, assert_vectorized, check_ema_update, float32_bound
from test_byol import fixed_batch_run

pytestmark = pytest.mark.ex_byol
RNG = random.Random(60)
CASES = [(1, 3), (5, 8), (16, 256)] + [(RNG.randint(2, 32), RNG.randint(2, 300)) for _ in range(2)]


def byol_loss_slow(p, z):
    """Eq. 2 per sample, in float64 with autograd: || p/|p| - z/|z| ||², averaged over the batch."""
    return sum(((pi / pi.norm() - zi / zi.norm()) ** 2).sum() for pi, zi in zip(p, z)) / len(p)


def inputs(B, D):
    g = torch.Generator().manual_seed(B * D)
    return torch.randn(B, D, generator=g) * 2, torch.randn(B, D, generator=g)


def tolerance(D, scale=1.0):
    # a cosine sums D products; each sample's value is at most 4
    return float32_bound(D, 4 * scale)


@pytest.mark.parametrize("B,D", CASES)
def test_loss_is_the_normalized_mse_of_eq_2(B, D):
    """Catches a loss that is not the mean of || p/|p| - z/|z| ||² (a missing normalization, a sum over the
    batch, 1 - cos instead of 2 - 2 cos)."""
    p, z = inputs(B, D)
    got = byol.byol_loss(p, z)
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == torch.float32
    assert_close_to_float64(got, byol_loss_slow(p.double(), z.double()), tolerance(D))


def test_loss_range_and_fixed_points():
    """Catches a loss that is not 0 for aligned vectors (whatever their length), 2 for orthogonal and 4 for
    opposite ones."""
    z = torch.randn(6, 32)
    for p, want in ((3 * z, 0.0), (-z, 4.0)):
        assert_close_to_float64(byol.byol_loss(p, z), torch.tensor(want, dtype=torch.float64), tolerance(32))
    assert_close_to_float64(byol.byol_loss(torch.eye(4)[:2], torch.eye(4)[2:]), torch.tensor(2.0).double(),
                            tolerance(4))


@pytest.mark.parametrize("B,D", CASES)
def test_gradient_matches_autograd_of_eq_2(B, D):
    """Catches a loss that gives the predictions no gradient (no_grad, detached, .item()) or the wrong one (a
    detached normalization, a sum instead of the mean)."""
    p, z = inputs(B, D)
    got = p.clone().requires_grad_()
    loss = byol.byol_loss(got, z)
    assert loss.requires_grad, "the loss carries no gradient"
    loss.backward()
    want = p.double().requires_grad_()
    byol_loss_slow(want, z.double()).backward()
    assert got.grad is not None, "no gradient reaches the predictions"
    assert_close_to_float64(got.grad, want.grad, tolerance(D, want.grad.abs().max().item()), "d loss / d p")


def test_loss_is_vectorized_over_the_batch():
    """Catches a Python loop over the samples: the same Python lines and torch ops at batch 8 and batch 64."""
    assert_vectorized(byol.byol_loss, lambda B: inputs(B, 16))


@pytest.mark.parametrize("m", [0.0, 1.0, 0.99, round(RNG.uniform(0.9, 0.999), 4), round(RNG.uniform(0.1, 0.9), 4)])
def test_ema_update_is_exact_and_leaves_buffers_alone(m):
    """Catches an EMA with tau on the online side, an update of the online network or of the target's buffers
    (BN statistics stay its own), a copy instead of an average, a new tensor instead of an in-place update, and
    an update that autograd records."""
    check_ema_update(byol.ema_update, m)


def test_predictions_and_targets_come_from_the_modules_the_paper_names():
    """Catches targets computed by the online backbone or projector instead of the target network's, a target
    branch that runs the predictor (§3.1: the predictor is the online network's only), predictions that skip the
    predictor or go through a target module, and targets that carry a gradient (no stop-gradient). At
    initialization the target network equals the online one, so a branch built from the wrong modules gives the
    same numbers: here its weights are made different first, then the model's p and z must equal an explicit
    forward through exactly Figure 2's modules, p = predictor(projector(backbone(x))) and
    z = target_projector(target_backbone(x)), each view through the MLPs on its own (per-view BN)."""
    torch.manual_seed(0)
    model = byol.BYOL(vit.vit_mini(img_size=16, patch_size=8), 64, 32).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every target weight scaled by its own random factor in [0.5, 1.5)
        for w in [*model.target_backbone.parameters(), *model.target_projector.parameters()]:
            w.mul_(torch.rand(w.shape, generator=g) + 0.5)
    x1, x2 = torch.randn(2, 8, 3, 16, 16, generator=g)
    h, p, z = model(torch.cat([x1, x2]))
    with torch.no_grad():
        h_want = torch.cat([model.backbone(v) for v in (x1, x2)])
        p_want = torch.cat([model.predictor(model.projector(model.backbone(v))) for v in (x1, x2)])
        z_want = torch.cat([model.target_projector(model.target_backbone(v)) for v in (x1, x2)])
        z_online = torch.cat([model.projector(model.backbone(v)) for v in (x1, x2)])
    torch.testing.assert_close(h.detach(), h_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p.detach(), p_want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, z_want, atol=1e-5, rtol=1e-4)
    assert not z.requires_grad and p.requires_grad and h.requires_grad
    assert (z - z_online).abs().max() > 0.1  # the two networks really differ here: the test can tell them apart


def test_train_one_epoch_learns_and_the_target_follows_by_ema():
    """Catches a step that does not train, a target network that gets gradients or the optimizer's update,
    and an EMA with the wrong weight (tau on the online side)."""
    snapshots = []
    spy = lambda model: snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})  # noqa
    model, losses = fixed_batch_run(lambda step: 0.9, steps=6, spy=spy)
    assert losses[-1] < losses[0] - 0.3 and all(b < a for a, b in zip(losses, losses[1:])), losses
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith("target_"):
            assert not p.requires_grad and p.grad is None, name
            online = params[name.replace("target_", "")]
            # after the last step: tau * (target before) + (1 - tau) * (online after the optimizer step)
            torch.testing.assert_close(p, 0.9 * snapshots[-1][name] + 0.1 * online.detach())
        elif p.requires_grad:
            assert not torch.equal(p, snapshots[0][name]), f"{name} did not move"

"""The course kit (course/README.md, course/make_student_copy.py): grading tests for the exercises that had none
against an independent reference on seeded random inputs (SimCLR's augmentation recipe field by field and as
measured on images, NT-Xent as a loop, the momentum updates of MoCo and BYOL, DINO's centre), and the kit itself:
every exercise's function exists with a docstring, its markers are registered and on the sheet, and the ast
rewriting keeps decorators, signature and docstring and raises NotImplementedError naming the exercise. Each
test names the bug it catches."""
import ast
import importlib.util
import inspect
import math
import os
import random
import re

import pytest
import torch

import byol
import data
import dino
import moco
import simclr
from common import ROOT

spec = importlib.util.spec_from_file_location("make_student_copy", os.path.join(ROOT, "course", "make_student_copy.py"))
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)
naive_spec = importlib.util.spec_from_file_location("course_naive", os.path.join(ROOT, "course", "naive.py"))
naive = importlib.util.module_from_spec(naive_spec)
naive_spec.loader.exec_module(naive)

RNG = random.Random(20)  # the graded cases: drawn once, seeded, so nobody can hard-code them by looking at a list


# ---- exercise 1: SimCLR's augmentation recipe ----
@pytest.mark.ex_simclr_aug
@pytest.mark.parametrize("img_size,strength", [(32, 0.5), (96, 1.0)] + [
    (RNG.choice([16, 24, 48, 64, 80, 128, 224]), round(RNG.uniform(0.2, 1.5), 3)) for _ in range(4)])
def test_simclr_spec_is_the_papers_recipe(img_size, strength):
    """Catches a crop range, aspect range, interpolation, flip, jitter strength or probability, grayscale or blur
    that is not SimCLR's App. A recipe at colour strength s (blur only from 64 px, App. B.9), or a strength ignored."""
    s = data.simclr_spec(img_size, strength=strength)
    assert isinstance(s, data.ViewSpec) and s.size == img_size
    assert s.scale == pytest.approx((0.08, 1.0)) and s.ratio == pytest.approx((3 / 4, 4 / 3))
    assert s.interpolation == "bicubic" and s.flip_p == 0.5
    assert s.jitter == pytest.approx((0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength))
    assert s.jitter_p == 0.8 and s.gray_p == 0.2 and s.solarize_p == 0.0
    if img_size >= 64:
        kernel = int(0.1 * img_size) // 2 * 2 + 1  # 10% of the side, odd (App. A: 23 px at 224)
        assert (s.blur_p, s.blur_kernel, s.blur_sigma) == (0.5, kernel, pytest.approx((0.1, 2.0)))
    else:
        assert s.blur_p == 0.0
    assert data.simclr_spec(img_size) == data.simclr_spec(img_size, 0.5)  # CIFAR-10's strength by default


@pytest.mark.ex_simclr_aug
@pytest.mark.parametrize("path", ["pil", "device"])
def test_simclr_views_show_the_papers_statistics(path):
    """Catches a recipe that reads right but draws wrong: crop areas and aspects, flips, brightness and hue
    factors, jitter and grayscale rates of 1000 views, measured on images (tests/test_data.py's measurements)."""
    import test_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: see test_data.one_thread
    try:
        test_data.test_crop_and_flip_statistics("simclr", path)
        test_data.test_colour_statistics("simclr", path)
    finally:
        torch.set_num_threads(threads)


# ---- exercise 2: NT-Xent as a loop ----
@pytest.mark.ex_simclr_loss_naive
@pytest.mark.parametrize("B,D,tau", [(2, 3, 0.5), (1, 4, 0.1)] + [
    (RNG.randint(2, 12), RNG.randint(2, 32), round(RNG.uniform(0.05, 1.0), 3)) for _ in range(4)])
def test_nt_xent_loss_naive_matches_algorithm_1(B, D, tau):
    """Catches a loop with a wrong partner, a self-similarity left in the denominator, a missing normalization or
    temperature, or the mean over B instead of 2B anchors: against test_simclr.nt_xent_slow on seeded inputs."""
    from test_simclr import nt_xent_slow
    g = torch.Generator().manual_seed(1000 * B + D)
    z1, z2 = torch.randn(B, D, generator=g) * 3, torch.randn(B, D, generator=g)
    got = naive.nt_xent_loss_naive(z1, z2, tau)
    assert isinstance(got, torch.Tensor) and got.dim() == 0
    assert got.item() == pytest.approx(nt_xent_slow(z1, z2, tau), rel=1e-6)
    c = torch.ones(B, D)  # collapse: the partner is one of 2B - 1 equal candidates
    assert naive.nt_xent_loss_naive(c, c, tau).item() == pytest.approx(math.log(max(1, 2 * B - 1)), abs=1e-6)


# ---- exercises 5, 6: the momentum (target) network's update ----
def two_networks(seed):
    """A small online network and a target that differs from it, with BatchNorm buffers that differ too."""
    torch.manual_seed(seed)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))  # noqa
    online, target = make(), make().requires_grad_(False)
    online(torch.randn(16, 5))  # online's BN running statistics move; the target's stay at their init
    return online, target


@pytest.mark.parametrize("module", [pytest.param(moco, marks=pytest.mark.ex_moco),
                                    pytest.param(byol, marks=pytest.mark.ex_byol)], ids=["moco", "byol"])
@pytest.mark.parametrize("m", [0.0, 1.0, round(RNG.uniform(0.9, 0.999), 4), round(RNG.uniform(0.1, 0.9), 4)])
def test_ema_update_moves_the_target_parameters_only(module, m):
    """Catches an EMA with m on the online side, an update of the online network or of the target's buffers (BN
    statistics stay its own), a copy instead of an average, and an update that autograd records."""
    online, target = two_networks(seed=int(m * 1000))
    online_before = {k: v.clone() for k, v in online.state_dict().items()}
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.enable_grad():
        module.ema_update(target, online, m)
    for (name, t), o in zip(target.named_parameters(), online.parameters()):
        torch.testing.assert_close(t, m * target_before[name] + (1 - m) * online_before[name], msg=name)
        assert t.grad_fn is None and not t.requires_grad and o.grad is None, name
    for name, b in target.named_buffers():
        assert torch.equal(b, target_before[name]), f"buffer {name} changed"
    for name, v in online.state_dict().items():
        assert torch.equal(v, online_before[name]), f"the online network's {name} changed"


# ---- exercise 9: DINO's centre ----
@pytest.mark.ex_dino
@pytest.mark.parametrize("B,K,m", [(4, 6, 0.9)] + [
    (RNG.randint(1, 16), RNG.randint(2, 64), round(RNG.uniform(0.5, 0.999), 4)) for _ in range(3)])
def test_update_center_is_an_ema_of_the_teachers_batch_mean(B, K, m):
    """Catches a centre that averages over one crop or the wrong axis, puts m on the new mean, is not updated in
    place, or is recorded by autograd: c <- m c + (1 - m) mean over both global crops and the batch (Eq. 4)."""
    g = torch.Generator().manual_seed(B * K)
    teacher, center = torch.randn(2, B, K, generator=g).requires_grad_(), torch.randn(K, generator=g)
    before, ref = center.clone(), center
    slow = [m * before[k].item() + (1 - m) * sum(teacher[i, b, k].item() for i in range(2) for b in range(B)) / (2 * B)
            for k in range(K)]
    dino.update_center(center, teacher, m)
    assert center is ref and center.shape == (K,) and not center.requires_grad
    torch.testing.assert_close(center, torch.tensor(slow), rtol=1e-5, atol=1e-6)


# ---- the kit ----
def test_every_exercise_function_exists_with_a_docstring_and_its_markers_are_registered_and_on_the_sheet():
    """Catches an exercise's function renamed or moved (the kit finds it by name), a docstring dropped (it is the
    student's specification), a marker missing from pytest.ini, and a sheet without the grading command."""
    ini = open(os.path.join(ROOT, "pytest.ini")).read()
    sheet = open(os.path.join(ROOT, "course", "README.md")).read()
    assert [e.number for e in kit.EXERCISES] == list(range(1, len(kit.EXERCISES) + 1))
    for e in kit.EXERCISES:
        for path, qualname in e.functions:
            fn = kit.find_function(ast.parse(open(os.path.join(ROOT, path)).read()), qualname)
            assert fn is not None, f"{path}: {qualname}"
            assert len(ast.get_docstring(fn) or "") > 80, f"{path}: {qualname} has no real docstring"
        for marker in (e.marker, e.needs_marker):
            assert re.search(rf"^\s+{marker}:", ini, re.M), marker
        assert f"python -m pytest -m {e.marker}" in sheet, e.marker
        assert re.search(rf"^## Exercise {e.number}\b", sheet, re.M), e.number


SAMPLE_SOURCE = '''import torch


# ---- loss ----
@torch.no_grad()
def f(x, y=2, *, z=None):
    """Docstring of f.

    Two paragraphs."""
    def inner(a):  # a helper that goes with the body
        return a + 1
    # the answer:
    return inner(x) * y
    # a trailing comment of the body


class Model:
    def forward(self, x, num_views=2):
        """Docstring of forward."""
        return x * num_views

    def other(self):
        return 3


def g():
    return 4
'''


def test_stub_source_keeps_signature_and_docstring_and_raises_naming_the_exercise():
    """Catches a rewrite that drops a decorator, changes a signature or a docstring, leaves part of the answer
    (a nested helper, a comment) behind, touches another function, or raises without naming the exercise."""
    stubbed = kit.stub_source(SAMPLE_SOURCE, {"f": "exercise 7: write m.f", "Model.forward": "exercise 8: write M"})
    assert "the answer" not in stubbed and "inner" not in stubbed and "trailing comment" not in stubbed
    assert "@torch.no_grad()\ndef f(x, y=2, *, z=None):" in stubbed and "# ---- loss ----" in stubbed
    namespace, reference = {}, {}
    exec(compile(stubbed, "<stubbed>", "exec"), namespace)
    exec(compile(SAMPLE_SOURCE, "<reference>", "exec"), reference)
    for get in (lambda ns: ns["f"], lambda ns: ns["Model"].forward):
        assert inspect.signature(get(namespace)) == inspect.signature(get(reference))
        assert get(namespace).__doc__ == get(reference).__doc__
    with pytest.raises(NotImplementedError, match="^exercise 7: write m.f$"):
        namespace["f"](1)
    with pytest.raises(NotImplementedError, match="^exercise 8: write M$"):
        namespace["Model"]().forward(1)
    assert namespace["Model"]().other() == 3 and namespace["g"]() == 4
    with pytest.raises(SystemExit, match="Model.other has no docstring"):
        kit.stub_source(SAMPLE_SOURCE, {"Model.other": "exercise 1: x"})
    with pytest.raises(SystemExit, match="no function h"):
        kit.stub_source(SAMPLE_SOURCE, {"h": "exercise 1: x"})


def test_student_copy_stubs_the_chosen_exercise_in_the_repository(tmp_path):
    """Catches a copy that stubs the wrong function or none, loses the docstring or signature of the real one,
    copies .git (its history holds the reference) or the instructor's answers, has no grading banner, or overwrites
    a folder it did not make."""
    out = tmp_path / "student"
    kit.main([str(out), "--exercises", "simclr_loss"])
    assert not (out / ".git").exists() and (out / "tests" / "data_sample").is_dir()
    assert not (out / "course" / "instructor_notes.md").exists() and (out / "course" / "README.md").exists()
    assert "python -m pytest -m ex_simclr_loss" in (out / "README.md").read_text()
    copy_spec = importlib.util.spec_from_file_location("student_simclr", out / "simclr.py")
    student = importlib.util.module_from_spec(copy_spec)
    copy_spec.loader.exec_module(student)
    assert inspect.signature(student.nt_xent_loss) == inspect.signature(simclr.nt_xent_loss)
    assert student.nt_xent_loss.__doc__ == simclr.nt_xent_loss.__doc__
    with pytest.raises(NotImplementedError, match="^exercise 3: write simclr.nt_xent_loss"):
        student.nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), 0.5)
    assert student.cosine_schedule(5, 100, 10, 1.0) == simclr.cosine_schedule(5, 100, 10, 1.0)  # the rest: as is
    for path, _ in kit.EXERCISES[3].functions:  # another exercise's file: byte for byte
        assert (out / path).read_bytes() == open(os.path.join(ROOT, path), "rb").read()
    kit.main([str(out), "--exercises", "4"])  # its own copy it may replace ...
    assert "exercise 4: write eval_linear.knn_classify" in (out / "eval_linear.py").read_text()
    assert (out / "simclr.py").read_bytes() == open(os.path.join(ROOT, "simclr.py"), "rb").read()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a student copy"):  # ... a folder of someone else's never
        kit.main([str(tmp_path / "mine")])
    with pytest.raises(SystemExit, match="unknown exercise"):
        kit.main([str(out), "--exercises", "nope"])

"""Grades exercise 1, SimCLR's augmentation recipe (data.simclr_spec): its fields against the paper's App. A and
B.9 at several sizes and strengths, and 1,000 views of it (and of SwAV's crops, which are SimCLR's recipe at
strength 1) measured on images through both pipelines. Instructor-only: the values here are the answer."""
import random

import pytest
import torch

import data
import test_data

pytestmark = pytest.mark.ex_simclr_aug
RNG = random.Random(20)  # the graded cases: drawn once, seeded, so nobody can hard-code them by looking at a list

# SimCLR App. A at colour strength s = 0.5 for CIFAR-10 (App. B.9): jitter 0.8 s, hue 0.2 s, p 0.8; SwAV's crops
# (main_swav.py): SimCLR's recipe at s = 1 on its own crop areas
PAPER = {
    "simclr": dict(scale=(0.08, 1.0), flip=0.5, brightness=0.4, hue=0.1, jitter_p=0.8, gray_p=0.2, solarize_p=0.0),
    "swav_global": dict(scale=(0.14, 1.0), flip=0.5, brightness=0.8, hue=0.2, jitter_p=0.8, gray_p=0.2,
                        solarize_p=0.0),
    "swav_small": dict(scale=(0.05, 0.14), flip=0.5, brightness=0.8, hue=0.2, jitter_p=0.8, gray_p=0.2,
                       solarize_p=0.0),
}


@pytest.mark.parametrize("img_size,strength", [(32, 0.5), (96, 1.0)] + [
    (RNG.choice([16, 24, 48, 64, 80, 128, 224]), round(RNG.uniform(0.2, 1.5), 3)) for _ in range(4)])
def test_fields_are_the_papers_recipe(img_size, strength):
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


@pytest.mark.parametrize("name", list(PAPER))
@pytest.mark.parametrize("path", test_data.PATHS)
def test_views_show_the_papers_statistics(name, path):
    """Catches a recipe that reads right but draws wrong: crop areas and aspects, flips, brightness and hue
    factors, jitter and grayscale rates of 1000 views, measured on images (tests/test_data.py's measurements),
    for SimCLR's view and SwAV's crops (SimCLR's recipe at strength 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: see test_data.one_thread
    try:
        test_data.check_crop_and_flip(name, path, PAPER[name])
        test_data.check_colour(name, path, PAPER[name])
    finally:
        torch.set_num_threads(threads)

"""data.py's batched augmentation path (--aug batched, the default), on the CPU (the same code runs on CUDA).

- every op against torchvision: the colour jitter's four ops with per-image factors and orders, grayscale,
  blur and solarization against v2.functional, and whole views against a slow per-image loop that draws
  from the same uniforms; the crop boxes against RandomResizedCrop's sampling written out per image, and the
  resized crop and flip read off a coordinate image;
- the random draws: per image and view, reproducible for a (seed, epoch), another for another epoch or seed,
  and the same whatever the batch or the process it falls in;
- the loader: the same batches of the same images as build_loader for a seed and epoch (same sampler,
  drop_last, len, set_epoch, shards), labels, every method's view shapes, CIFAR's and STL-10's in-memory
  arrays, and a one-line DataError for a folder of images of different sizes.
The paper statistics of both paths, side by side, are in test_data.py (test_crop_and_flip_statistics,
test_colour_statistics, test_device_path_draws_what_the_pil_path_draws).
"""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import data
from common import read_log

SAMPLE = data.SAMPLE_DIR
MEAN, STD = data.MEAN_STD["cifar10"]
NO_CROP = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)  # the crop box is the whole image, no flip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: a second thread gains nothing, and on a busy machine OpenMP's spinning threads make the
    batched ops many times slower (a 2-core machine under load: 94 s instead of 11 s for this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- each op against torchvision ----

@pytest.mark.parametrize("op, lo, hi", [(0, 0.0, 2.0), (1, 0.0, 2.0), (2, 0.0, 2.0), (3, -0.5, 0.5)])
def test_colour_ops_match_torchvision(op, lo, hi):
    """Catches a colour op that is not torchvision's (brightness not a multiply, contrast against the mean of
    another image than the grayscale one, saturation against the mean, a hue turned the wrong way or in the
    wrong units, no clamping): per-image factors against v2.functional.adjust_* image by image."""
    names = ["adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"]
    torch.manual_seed(0)
    x = torch.rand(16, 3, 12, 10)
    f = lo + (hi - lo) * torch.rand(16)
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(16, 1)  # the identities: the other ops do nothing
    factors[:, op] = f
    order = torch.tensor([op] + [o for o in range(4) if o != op]).repeat(16, 1)
    y = data.color_jitter(x, factors, order)
    want = torch.stack([getattr(TF, names[op])(x[b], f[b].item()) for b in range(16)])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)


def test_grayscale_blur_solarize_match_torchvision():
    """Catches grayscale weights other than torchvision's (ITU-R 601-2), a blur kernel or padding other than
    v2.functional.gaussian_blur's, per-image sigmas mixed up between images, and a solarization threshold other
    than the PIL path's 128 of 255."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 20, 24)
    torch.testing.assert_close(data.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    sigma = 0.1 + 1.9 * torch.rand(8)
    want = torch.stack([TF.gaussian_blur(x[b], [7, 7], [sigma[b].item()] * 2) for b in range(8)])
    torch.testing.assert_close(data.gaussian_blur(x, 7, sigma), want, atol=1e-5, rtol=0)
    # solarization through a whole view, on every uint8 level: against the PIL path's RandomSolarize(128)
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    spec = data.ViewSpec(16, **NO_CROP, solarize_p=1.0)
    y = data.device_views(levels, torch.arange(1), [spec], (0, 0, 0), (1, 1, 1))[0] * 255
    torch.testing.assert_close(y, v2.RandomSolarize(128, p=1.0)(levels).float(), atol=1e-3, rtol=0)


def reference_view(x, spec, u):
    """A view as torchvision makes it, one image at a time, from the image's uniforms u (DRAWS,) in data.py's
    columns: RandomApply's p, ColorJitter's factors and order (v2.ColorJitter: a random permutation of the
    four ops), grayscale, GaussianBlur's sigma, solarization. No crop (the spec's crop is the whole image)."""
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if u[data.U_JITTER] < spec.jitter_p:
        s = spec.jitter
        ranges = [(max(0.0, 1 - v), 1 + v) for v in s[:3]] + [(-s[3], s[3])]
        factors = [lo + (hi - lo) * u[data.U_FACTORS][i].item() for i, (lo, hi) in enumerate(ranges)]
        for op in u[data.U_ORDER].argsort().tolist():
            x = adjust[op](x, factors[op])
    if u[data.U_GRAY] < spec.gray_p:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if u[data.U_BLUR] < spec.blur_p:
        sigma = spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u[data.U_SIGMA].item()
        x = TF.gaussian_blur(x, [spec.blur_kernel] * 2, [sigma] * 2)
    if u[data.U_SOLARIZE] < spec.solarize_p:
        x = TF.solarize(x, 0.5)
    return x


@pytest.mark.needs_simclr_aug
@pytest.mark.parametrize("make_spec", [lambda: data.simclr_spec(64), lambda: data.byol_specs(64)[0],
                                       lambda: data.byol_specs(64)[1], lambda: data.multicrop_specs(64)[0]],
                         ids=["simclr", "byol_1", "byol_2", "swav"])
def test_views_match_a_slow_loop(make_spec):
    """Catches per-batch instead of per-image factors, probabilities or sigmas, a fixed or shared order of the
    jitter's ops, ops in another order than the PIL path's, or jitter ranges not torchvision's: every image's
    view against torchvision's functional ops applied to it alone, with its own draws (64 px, so with blur)."""
    B = 48
    torch.manual_seed(0)
    x = torch.rand(B, 3, 64, 64)
    spec = dataclasses.replace(make_spec(), **NO_CROP)
    u = data.uniforms(0, 0, torch.arange(B), view=1)
    y = data.device_view(x, spec, u)
    want = torch.stack([reference_view(x[b], spec, u[b]) for b in range(B)])
    torch.testing.assert_close(y, want, atol=2e-5, rtol=0)


def reference_crop_box(u, height, width, scale, ratio):
    """v2.RandomResizedCrop.make_params (torchvision 0.29) for one image, drawing from its uniforms u."""
    for t in range(10):
        area = height * width * (scale[0] + (scale[1] - scale[0]) * u[data.U_AREA][t].item())
        log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[data.U_ASPECT][t].item())
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[data.U_TOP].item() * (height - h + 1))  # torch.randint(0, height - h + 1)
            left = int(u[data.U_LEFT].item() * (width - w + 1))
            return top, left, h, w
    if width / height < min(ratio):  # fallback: a central crop
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.05, 0.14), (3 / 4, 4 / 3)),
                                          ((0.4, 1.0), (0.5, 0.6))])  # the last: many fallbacks
def test_crop_boxes_and_resized_crop(scale, ratio):
    """Catches a vectorized crop sampling that is not RandomResizedCrop's (the last fitting try instead of
    the first, no or another fallback, height and width swapped on a non-square image), and a resized crop
    or flip that does not show that box: boxes against the per-image algorithm, then read off a coordinate
    image through resized_crop."""
    H, W, B, s = 40, 64, 256, 16
    u = data.uniforms(0, 0, torch.arange(B), view=0)
    top, left, h, w = data.crop_boxes(u, H, W, scale, ratio)
    boxes = torch.stack([top, left, h, w], 1)
    want = torch.tensor([reference_crop_box(u[b], H, W, scale, ratio) for b in range(B)], dtype=boxes.dtype)
    assert torch.equal(boxes, want)
    if ratio == (0.5, 0.6):
        assert (w == 24).sum() > B // 4  # the fallback (40 x 24) was exercised
    # pixel value = its x or y position: the output samples the box's pixel centres (align_corners=False),
    # so two outputs k1 < k2 of a row are (k2 - k1) w / s pixels apart
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    coords = torch.stack([xs, ys, torch.zeros_like(xs)]).expand(B, 3, H, W)
    flip = u[:, data.U_FLIP] < 0.5
    out = data.resized_crop(coords, top, left, h, w, flip, s)                  # (B, 3, s, s)
    k1, k2 = s // 4, 3 * s // 4  # inside the image for any box of 2 px or more: no border padding
    dx = (out[:, 0, k1, k2] - out[:, 0, k1, k1]) * s / (k2 - k1)
    dy = (out[:, 1, k2, k1] - out[:, 1, k1, k1]) * s / (k2 - k1)
    torch.testing.assert_close(dx, torch.where(flip, -w, w), atol=1e-3, rtol=0)
    torch.testing.assert_close(dy, h, atol=1e-3, rtol=0)
    centre_x = out[:, 0, :, s // 2 - 1:s // 2 + 1].mean((1, 2))  # between the two middle columns
    centre_y = out[:, 1, s // 2 - 1:s // 2 + 1, :].mean((1, 2))
    torch.testing.assert_close(centre_x, left + w / 2 - 0.5, atol=1e-3, rtol=0)
    torch.testing.assert_close(centre_y, top + h / 2 - 0.5, atol=1e-3, rtol=0)


# ---- the random draws ----

def test_uniforms_per_image_view_seed_and_epoch():
    """Catches draws shared by images or views of a batch, draws that depend on the batch an image falls in
    (then 1 process and 2 would see other views, and --resume too), and draws that repeat across epochs or
    seeds; and a poor generator: the first two moments and neighbour correlations of uniform [0, 1)."""
    idx = torch.arange(4096)
    u = data.uniforms(0, 0, idx, view=0)                                         # (4096, DRAWS)
    assert u.shape == (4096, data.DRAWS) and u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    flat = u.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01  # neighbouring columns
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1].item()) < 0.05  # neighbouring images
    assert len(flat.unique()) > 0.99 * flat.numel()
    assert torch.equal(data.uniforms(0, 0, idx[[7, 3]], view=0), u[[7, 3]])  # whatever the batch
    for seed, epoch, view in ((0, 0, 1), (0, 1, 0), (1, 0, 0)):
        other = data.uniforms(seed, epoch, idx, view)
        assert (other == u).float().mean() < 0.001


@pytest.mark.needs_simclr_aug
def test_identical_images_get_their_own_views():
    """Catches a batch that shares its random draws: one image repeated 256 times must give 256 different
    views, with about as many brightness factors (measured on grey) as images with jitter on."""
    img = v2.functional.pil_to_tensor(Image.open(next((SAMPLE / "train" / "cat").glob("*.jpg"))).convert("RGB"))
    B = 256
    views = data.device_views(img.expand(B, -1, -1, -1), torch.arange(B), [data.simclr_spec(32)] * 2, MEAN, STD)
    flat = torch.cat(views).flatten(1)                                          # (2B, 3 * 32 * 32)
    assert len(flat.unique(dim=0)) == 2 * B
    grey = torch.full((B, 3, 8, 8), 128, dtype=torch.uint8)
    spec = data.ViewSpec(8, jitter=(0.4, 0.0, 0.0, 0.0), jitter_p=0.8)
    factors = data.device_views(grey, torch.arange(B), [spec], (0, 0, 0), (1, 1, 1))[0][:, 0, 0, 0]
    assert len(factors.unique()) > B // 2  # 80% jittered, each its own factor


# ---- the loader ----

@pytest.fixture(scope="module")
def sample_train():
    return data.build_dataset("folder", SAMPLE, "train")


def test_loader_yields_build_loaders_batches(sample_train):
    """Catches a device loader with another shuffle, other batches, a kept partial batch, another length or
    other labels than build_loader for the same seed and epoch, or one that ignores set_epoch or the seed:
    with a crop of the whole image and no colour ops its views are build_loader's normalized images."""
    spec = data.ViewSpec(32, **NO_CROP)
    plain = data.build_dataset("folder", SAMPLE, "train", data.MultiView(data.eval_transform(32, MEAN, STD)))
    orders = []
    for seed, epoch in ((0, 0), (0, 3), (5, 0)):
        loader = data.build_loader(plain, 128, workers=0, train=True, seed=seed)
        device = data.build_device_loader(sample_train, [spec], MEAN, STD, 128, "cpu", seed=seed)
        data.set_epoch(loader, epoch)
        data.set_epoch(device, epoch)
        assert len(device) == len(loader) == 1000 // 128 == 7
        batches = list(device)
        assert len(batches) == 7
        for ((x,), y), ((x_d,), y_d) in zip(loader, batches):
            assert torch.equal(y, y_d)
            torch.testing.assert_close(x_d, x, atol=1e-5, rtol=0)
        orders.append(list(device.sampler))
    assert orders[0] != orders[1] and orders[0] != orders[2]  # set_epoch and the seed change the order


@pytest.mark.needs_simclr_aug
@pytest.mark.parametrize("method, sizes", [("simclr", [32] * 2), ("byol", [32] * 2),
                                           ("swav", [32] * 2 + [16] * 6)])
def test_loader_views_per_method(sample_train, method, sizes):
    """Catches a method's views of the wrong number, size, dtype or device, un-normalized views, or labels
    that are not the images': every method's specs through the device loader on the shipped sample."""
    loader = data.build_device_loader(sample_train, data.method_specs(method, 32), MEAN, STD, 64, "cpu", seed=0)
    views, labels = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(64, 3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in views)
    assert min(v.min().item() for v in views) < -1 and max(v.max().item() for v in views) > 1  # normalized
    assert not torch.equal(views[0], views[1])  # two views, two draws
    order = list(loader.sampler)[:64]
    assert labels.tolist() == [sample_train.targets[i] for i in order]


def test_same_views_for_a_seed_epoch_and_image_in_any_batch_or_process(sample_train):
    """Catches views drawn from a generator seeded per batch, rank or step: an image's views must be the same
    in one process with batch 100 as in two processes (DistributedSampler shards) with batch 50, and the same
    again for the same (seed, epoch); another epoch gives other views of it."""
    specs = data.byol_specs(32)
    images, labels = data.decode_all(sample_train)[:2]

    def views_by_image(batch, rank=0, world=1, epoch=2):
        loader = data.DeviceLoader(images, labels, specs, MEAN, STD, batch, seed=0, rank=rank, world=world)
        data.set_epoch(loader, epoch)
        indices = list(loader.sampler)
        out = {}
        for b, (views, _) in enumerate(loader):
            for j in range(batch):
                out[indices[b * batch + j]] = torch.stack([v[j] for v in views])
        return out

    one = views_by_image(100)
    two = {**views_by_image(50, rank=0, world=2), **views_by_image(50, rank=1, world=2)}
    assert set(one) == set(two) and len(one) == 1000
    assert all(torch.equal(one[i], two[i]) for i in one)
    again, other = views_by_image(100), views_by_image(100, epoch=3)
    assert all(torch.equal(one[i], again[i]) for i in one)
    assert all(not torch.equal(one[i], other[i]) for i in one)


def test_loader_under_torch_distributed(sample_train, tmp_path, monkeypatch):
    """Catches a device loader that does not shard by the process group's rank and size (every process would
    then train on the whole dataset): in a gloo group, as rank 1 of 2, it must hold build_loader's shard."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
        loader = data.build_device_loader(sample_train, data.byol_specs(32), MEAN, STD, 10, "cpu")
        ref = data.build_loader(sample_train, 10, workers=0, train=True)
        assert (loader.sampler.rank, loader.sampler.num_replicas) == (1, 2) and loader.sampler.drop_last
        assert list(loader.sampler) == list(ref.sampler) and len(loader) == len(ref) == 500 // 10
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["cifar", "stl"])
def test_in_memory_arrays_of_cifar_and_stl(kind):
    """Catches CIFAR's (N, H, W, C) array taken as (N, C, H, W), or STL-10's unlabeled -1 labels lost: the
    decoded tensor against the images the dataset's own __getitem__ returns."""
    rng = np.random.default_rng(0)
    if kind == "cifar":
        ds = object.__new__(torchvision.datasets.CIFAR10)  # the arrays CIFAR10.__init__ would read from disk
        ds.data, ds.targets = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), [3, 1, 4, 1, 5, 9]
    else:
        ds = object.__new__(torchvision.datasets.STL10)
        ds.data, ds.labels = rng.integers(0, 256, (6, 3, 96, 96), dtype=np.uint8), np.array([3, 1, 4, -1, -1, -1])
    ds.transform = ds.target_transform = None
    images, labels = data.decode_all(ds)[:2]
    assert images.shape == (6, 3, *ds[0][0].size[::-1]) and images.dtype == torch.uint8
    assert all(torch.equal(images[i], v2.functional.pil_to_tensor(ds[i][0])) for i in range(6))
    assert labels.tolist() == [ds[i][1] for i in range(6)]


def test_images_of_different_sizes_give_one_line_or_pil(tmp_path):
    """Catches a mixed-size folder that fails with a traceback from torch.stack instead of saying what to do
    (--aug batched), or that stops a run whose --aug auto could have taken the PIL path instead."""
    for i, size in enumerate([(32, 32), (32, 32), (40, 48)]):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(tmp_path / "train" / "a" / f"{i}.png")
    ds = data.build_dataset("folder", tmp_path, "train")
    with pytest.raises(data.DataError, match=r"2\.png is 40x48 and .*0\.png 32x32: use --aug pil") as e:
        data.build_train_loader(ds, data.byol_specs(32), MEAN, STD, 2, 0, "cpu", aug="batched")
    assert isinstance(e.value, SystemExit) and "\n" not in str(e.value)
    loader = data.build_train_loader(ds, data.byol_specs(32), MEAN, STD, 2, 0, "cpu", aug="auto")
    assert not isinstance(loader, data.DeviceLoader) and [v.shape[-1] for v in next(iter(loader))[0]] == [32, 32]


@pytest.mark.needs_simclr_aug
def test_show_device_views(tmp_path):
    """Catches `python data.py --show swav --aug batched` failing or drawing another grid than the PIL path's."""
    out = tmp_path / "v.png"
    data.show("swav", out, rows=3, aug="batched")
    assert Image.open(out).size == (4 * (9 * 34 + 2), 4 * (3 * 34 + 2) + data.SHOW_HEADER)


# ---- the training scripts' default path (--aug auto: batched where the set fits) ----

GPU_AUG_RUNS = {  # method: (its extra flags, the views it must train on at 16 px, small crops of 8 px)
    "simclr": (["--color-strength", "0.3"], lambda: [data.simclr_spec(16, strength=0.3)] * 2),
    "moco": ([], lambda: list(data.byol_specs(16))),
    "byol": ([], lambda: list(data.byol_specs(16))),
    "swav": (["--color-strength", "0.3", "--num-small-crops", "2", "--small-crop-size", "8", "--num-prototypes", "32",
              "--queue", "0"], lambda: data.multicrop_specs(16, n_global=2, n_local=2, local_size=8, strength=0.3)),
    "dino": (["--num-small-crops", "2", "--small-crop-size", "8", "--out-dim", "64", "--bottleneck-dim", "32"],
             lambda: data.dino_specs(16, n_local=2, local_size=8)),
}


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
@pytest.mark.needs_dino
@pytest.mark.parametrize("method", sorted(GPU_AUG_RUNS))
def test_training_scripts_train_on_device_views(method, tiny_data, tmp_path, monkeypatch):
    """Catches a method whose default is not the batched path (PIL views in loader workers after all), that builds
    another method's recipe or drops a recipe flag (--color-strength, the small crops), or whose epochs do not
    take their batches from the device loader."""
    import importlib
    module = importlib.import_module(method)
    extra, make_specs = GPU_AUG_RUNS[method]
    want_specs = make_specs()
    built, batches = [], []
    monkeypatch.setattr(data, "build_device_loader", lambda dataset, specs, *a, real=data.build_device_loader, **k: (
        built.append(list(specs)) or real(dataset, specs, *a, **k)))
    monkeypatch.setattr(data.DeviceLoader, "__iter__", lambda self, real=data.DeviceLoader.__iter__: (
        batches.append(b) or b for b in real(self)))
    monkeypatch.setattr(data, "build_loader", lambda *a, **k: pytest.fail("a PIL loader"))  # --knn-every 0
    module.main(["--dataset", "folder", "--data-dir", str(tiny_data), "--arch", "vit_mini", "--patch-size", "8",
                 "--img-size", "16", "--epochs", "1", "--batch-size", "64", "--warmup-epochs", "1", "--workers", "0",
                 "--hidden-dim", "256", "--knn-every", "0", "--device", "cpu",
                 "--out", str(tmp_path), *extra])
    assert built == [want_specs]
    assert len(batches) == 200 // 64                                   # every step of the epoch, from the device
    views, labels = batches[0]
    assert [v.shape[-1] for v in views] == [s.size for s in want_specs] and labels.shape == (64,)
    log = read_log(tmp_path)  # the training epochs (the epoch-0 line is the untrained k-NN)
    assert len(log) == 1 and math.isfinite(log[0]["loss"])


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.parametrize("flags, budget, path", [
    ([], None, "batched"),                    # the default, where the set fits the budget
    ([], 1000, "pil"),                        # the default, where it does not (the sample is 3 MB as uint8)
    (["--aug", "pil"], None, "pil"),
    (["--aug", "batched"], 1000, "batched"),  # an explicit choice is kept
    (["--gpu-aug"], None, "batched"),         # the old name
])
def test_which_path_a_training_script_takes(flags, budget, path, tiny_data, tmp_path, monkeypatch, capsys):
    """Catches --aug auto taking the batched path for a set over the budget (or PIL for one within it), an
    explicit --aug overruled, --gpu-aug no longer meaning batched, or a run that does not say which path it took
    and why."""
    import simclr
    if budget is not None:
        monkeypatch.setattr(data, "BATCHED_BUDGET", budget)
    taken = []
    monkeypatch.setattr(data, "build_device_loader", lambda *a, real=data.build_device_loader, **k: (
        taken.append("batched") or real(*a, **k)))
    monkeypatch.setattr(data, "build_loader", lambda *a, real=data.build_loader, **k: (
        taken.append("pil") or real(*a, **k)))
    simclr.main(["--dataset", "folder", "--data-dir", str(tiny_data), "--arch", "vit_mini", "--patch-size", "8",
                 "--img-size", "16", "--epochs", "1", "--batch-size", "100", "--warmup-epochs", "1", "--workers", "0",
                 "--hidden-dim", "64", "--knn-every", "0", "--device", "cpu", "--out", str(tmp_path), *flags])
    assert taken == [path]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("augmentation:")]
    assert len(said) == 1 and said[0].startswith(f"augmentation: {path} ("), said
    assert ("budget" in said[0]) == ("--aug" not in " ".join(flags) and "--gpu-aug" not in flags)


def folder_of(root, sizes):
    for i, size in enumerate(sizes):
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (i * 40 % 256, 7 * i % 256, 90)).save(root / "train" / f"c{i % 2}" / f"{i}.png")
    return data.build_dataset("folder", root, "train")


def test_decoded_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    """Catches a decode cache that is not written, not used by the next run (the files decoded again), or used
    after a file changed (stale images trained on): the cached tensor against a fresh decode each time."""
    ds = folder_of(tmp_path, [(8, 8)] * 6)
    images, labels, how = data.decode_all(ds, workers=2)
    assert (tmp_path / ".decoded-train.pt").exists() and "cached in" in how
    fresh = torch.stack([v2.functional.pil_to_tensor(ds.loader(p)) for p, _ in ds.samples])
    assert torch.equal(images, fresh) and labels.tolist() == ds.targets
    real = data._decode_files
    monkeypatch.setattr(data, "_decode_files", lambda *a, **k: pytest.fail("decoded again"))
    again, labels2, how = data.decode_all(data.build_dataset("folder", tmp_path, "train"))
    assert torch.equal(again, fresh) and labels2.tolist() == ds.targets and "loaded from" in how
    monkeypatch.setattr(data, "_decode_files", real)
    other = open(ds.samples[5][0], "rb").read()  # the same name and size, other pixels: only the time tells
    assert len(other) == os.path.getsize(ds.samples[3][0]) and not torch.equal(fresh[3], fresh[5])
    open(ds.samples[3][0], "wb").write(other)
    changed, _, how = data.decode_all(data.build_dataset("folder", tmp_path, "train"))
    assert "decoded" in how and torch.equal(changed[3], fresh[5])
    (tmp_path / ".decoded-train.pt").write_bytes(b"not a cache")  # a broken cache is decoded past, then replaced
    assert torch.equal(data.decode_all(data.build_dataset("folder", tmp_path, "train"))[0], changed)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("read-only file system")))
    (tmp_path / ".decoded-train.pt").unlink()
    _, _, how = data.decode_all(data.build_dataset("folder", tmp_path, "train"))
    assert "not cached: read-only file system" in how  # a folder that cannot take the cache still trains


def test_parallel_decode_keeps_the_order(tmp_path):
    """Catches images decoded on threads stored out of order (an image under another's label): 1 thread and 3
    against the files read one by one."""
    ds = folder_of(tmp_path, [(8, 8)] * 40)
    fresh = torch.stack([v2.functional.pil_to_tensor(ds.loader(p)) for p, _ in ds.samples])
    for workers in (1, 3):
        assert torch.equal(data.decode_all(ds, workers=workers, cache=False)[0], fresh)


def test_choose_aug_budget_from_the_first_image(tmp_path):
    """Catches the auto rule's size estimate wrong (not N x 3 x H x W bytes) or the comparison inverted."""
    ds = folder_of(tmp_path, [(10, 6)] * 4)
    assert data.decoded_bytes(ds) == 4 * 3 * 10 * 6
    assert data.choose_aug("auto", ds, "cpu")[0] == "batched"
    old = data.BATCHED_BUDGET
    try:
        data.BATCHED_BUDGET = 4 * 3 * 10 * 6 - 1
        path, why = data.choose_aug("auto", ds, "cpu")
        assert path == "pil" and "more than" in why
        assert data.choose_aug("batched", ds, "cpu")[0] == "batched" and data.choose_aug("pil", ds, "cpu")[0] == "pil"
    finally:
        data.BATCHED_BUDGET = old


# ---- the evaluation loader ----

def pil_eval_batches(ds, size, batch_size):
    """The PIL evaluation path: build_loader over eval_transform, as every script's features were made before."""
    return list(data.build_loader(data.Transformed(ds, data.eval_transform(size, MEAN, STD)), batch_size, 0,
                                  train=False))


@pytest.mark.parametrize("size, budget, decoded", [(32, None, True), (24, None, False), (32, 1000, False)])
def test_eval_loader_equals_the_pil_path_bit_for_bit(sample_train, size, budget, decoded, monkeypatch):
    """Catches the decoded evaluation path changing any feature: pixels that differ from eval_transform's in any
    bit (another scale, the normalization missing or swapped), batches out of order, labels shifted, the last
    partial batch dropped; and the decoded path taken where eval_transform must resize (24 px of 32 px images)
    or where the set is over the budget, or not taken where it applies."""
    if budget is not None:
        monkeypatch.setattr(data, "BATCHED_BUDGET", budget)
    loader = data.build_eval_loader(sample_train, size, MEAN, STD, 96, workers=0)
    assert isinstance(loader, data.DecodedEval) == decoded
    got, want = list(loader), pil_eval_batches(sample_train, size, 96)
    assert len(got) == len(loader) == len(want) == math.ceil(1000 / 96)
    for (x, y), (x_want, y_want) in zip(got, want):
        assert x.shape == (len(y_want), 3, size, size)
        assert torch.equal(x, x_want) and torch.equal(torch.as_tensor(y), y_want)


def test_eval_loader_of_a_subset_and_of_mixed_sizes(sample_train, tmp_path):
    """Catches a Subset (eval_linear --val-fraction) evaluated on the whole set or other images, and a folder of
    mixed sizes that fails instead of taking the PIL path (which resizes each image)."""
    part = torch.utils.data.Subset(sample_train, list(range(5, 1000, 7)))
    got, want = list(data.build_eval_loader(part, 32, MEAN, STD, 50, 0)), pil_eval_batches(part, 32, 50)
    assert len(got) == len(want) == 3
    assert all(torch.equal(x, xw) and torch.equal(y, yw) for (x, y), (xw, yw) in zip(got, want))
    mixed = folder_of(tmp_path, [(32, 32), (32, 32), (40, 48)])
    loader = data.build_eval_loader(mixed, 32, MEAN, STD, 2, 0)
    assert not isinstance(loader, data.DecodedEval)
    assert [x.shape for x, _ in loader] == [(2, 3, 32, 32), (1, 3, 32, 32)]


def test_eval_loader_under_torch_distributed(sample_train, tmp_path, monkeypatch):
    """Catches the decoded evaluation path not sharding by rank and world size (each process would extract, and
    the gather would repeat, every image) or sharding otherwise than build_loader's Shard: as rank 1 of 2."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
        loader = data.build_eval_loader(sample_train, 32, MEAN, STD, 64, 0)
        assert isinstance(loader, data.DecodedEval)
        got, want = list(loader), pil_eval_batches(sample_train, 32, 64)
        assert len(got) == len(want) == math.ceil(500 / 64)
        assert all(torch.equal(x, xw) and torch.equal(y, yw) for (x, y), (xw, yw) in zip(got, want))
    finally:
        torch.distributed.destroy_process_group()

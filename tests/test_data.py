"""data.py: datasets, augmentations and loaders, on the shipped CIFAR-10 sample (tests/data_sample), CPU.

- every method's views: count, size, dtype, normalization, randomness; multi-crop sizes; BYOL's blur kernel
  and its p 1.0 / 0.1 asymmetry; PIL and uint8-tensor inputs give the same shapes;
- the sample loads through the `folder` path: 10 classes in CIFAR's order, 100 / 50 images per class,
  and it is real labeled data (a raw-pixel nearest neighbour beats chance by far);
- missing or malformed data raises DataError (a SystemExit) with a one-line message saying what to do,
  and `python data.py` prints that line without a traceback;
- build_loader: drop_last, shuffling, batch shapes, the DistributedSampler (one replica in one process) with
  set_epoch and the seed, eval shards under torch.distributed; views that depend on (seed, epoch, image) only;
- BYOL's crop, flip, colour jitter, grayscale and solarization measured on images against the paper's values
  (crop boxes read off a coordinate image, colour factors off uniform images), every recipe's the same on both
  paths; SimCLR's and SwAV's values are the course's exercise 1, measured by its grading tests with these helpers;
- exercise 1's checks that give no value away: simclr_spec is a ViewSpec whose strength scales the jitter only.
"""
import colorsys
import dataclasses
import functools
import importlib
import math
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

import data
from common import small_folder

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data_sample"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN, STD = data.MEAN_STD["cifar10"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: a second thread gains nothing, and on a busy machine OpenMP's spinning threads make the
    batched ops many times slower (the device path's statistics: 28 s instead of 0.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def img():
    return Image.open(next((SAMPLE / "train" / "cat").glob("*.jpg"))).convert("RGB")


@pytest.mark.needs_simclr_aug
@pytest.mark.parametrize("method, sizes", [("simclr", [32] * 2), ("byol", [32] * 2), ("moco", [32] * 2),
                                           ("swav", [32] * 2 + [16] * 6)])
def test_method_views(img, method, sizes):
    torch.manual_seed(0)
    views = data.method_views(method, 32, MEAN, STD)(img)
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 for v in views)
    assert min(v.min().item() for v in views) < 0  # normalized, not in [0, 1]
    assert not torch.equal(views[0], views[1])  # two random draws


@pytest.mark.needs_simclr_aug
def test_uint8_tensor_input_gives_the_same_views_shapes(img):
    x = v2.functional.pil_to_tensor(img)  # what decode_image returns: uint8 (3, H, W)
    for t in [data.simclr_transform(32, MEAN, STD), *data.byol_transforms(32, MEAN, STD)]:
        y = t(x)
        assert y.shape == (3, 32, 32) and y.dtype == torch.float32


@pytest.mark.ex_simclr_aug
def test_simclr_spec_is_a_viewspec_whose_strength_scales_the_colour_jitter_only(img):
    """Exercise 1's own checks (the grade is the instructor's; these give no value of the recipe away). Catches a
    recipe that is not a ViewSpec of the asked side, ignores the colour strength or lets it change anything but
    the jitter, blurs below 64 px (the docstring), or does not run through both pipelines (PIL and batched)."""
    for size in (32, 96):
        spec = data.simclr_spec(size)
        assert isinstance(spec, data.ViewSpec) and spec.size == size and spec == data.simclr_spec(size, 0.5)
        assert any(spec.jitter), "no colour jitter at the default strength"
        strong, none = data.simclr_spec(size, 1.0), data.simclr_spec(size, 0.0)
        assert strong.jitter == pytest.approx(tuple(2 * j for j in spec.jitter)) and not any(none.jitter)
        assert dataclasses.replace(strong, jitter=spec.jitter) == spec == dataclasses.replace(none, jitter=spec.jitter)
    assert data.simclr_spec(32).blur_p == 0 and data.simclr_spec(96).blur_p > 0
    torch.manual_seed(0)
    for spec in (data.simclr_spec(32), data.simclr_spec(96)):
        a, b = data.pil_transform(spec, MEAN, STD)(img), data.pil_transform(spec, MEAN, STD)(img)
        assert a.shape == (3, spec.size, spec.size) and not torch.equal(a, b)
        x = v2.functional.pil_to_tensor(img).expand(2, -1, -1, -1)
        (views,) = data.device_views(x, torch.arange(2), [spec], MEAN, STD)
        assert views.shape == (2, 3, spec.size, spec.size) and not torch.equal(views[0], views[1])


@pytest.mark.needs_simclr_aug
def test_multicrop_paper_setting():
    big = Image.new("RGB", (256, 256), (120, 60, 30))
    views = data.multicrop_transform(224, MEAN, STD, local_size=96)(big)  # SwAV: 2x224 + 6x96
    assert [v.shape[-1] for v in views] == [224] * 2 + [96] * 6
    views = data.multicrop_transform(32, MEAN, STD, n_global=2, n_local=4, local_size=8)(big)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 8, 8)] * 4


def _blurs(t):  # (kernel size, probability) of each GaussianBlur inside a Compose of RandomApply
    return [(b.kernel_size, r.p) for r in t.transforms if isinstance(r, v2.RandomApply)
            for b in r.transforms if isinstance(b, v2.GaussianBlur)]


def test_blur_follows_the_papers():
    t1, t2 = data.byol_transforms(224, MEAN, STD)
    assert _blurs(t1) == [((23, 23), 1.0)] and _blurs(t2) == [((23, 23), 0.1)]  # BYOL Table 6, 23 px at 224
    t1, t2 = data.byol_transforms(64, MEAN, STD)
    assert _blurs(t1) == [((7, 7), 1.0)] and _blurs(t2) == [((7, 7), 0.1)]  # 10% of 64, odd
    assert [s.blur_p for s in data.byol_specs(32)] == [0.0, 0.0]  # CIFAR: no blur (B.9) ...
    assert _blurs(data.byol_transforms(32, MEAN, STD)[0]) == []  # ... and an op of p 0 is left out


def test_dino_recipe_is_main_dino():
    """Catches DINO's crops drifting from the reference's DataAugmentationDINO: the crop areas, the bicubic resize,
    its jitter (0.4, 0.4, 0.2, 0.1) (not SwAV's colour strength), solarization of the second global crop only,
    blur p 1.0 / 0.1 / 0.5 where there is blur (from 64 px), the paper's 2 x 224 + 8 x 96 crops."""
    specs = data.dino_specs(224, local_size=96)
    assert [s.size for s in specs] == [224] * 2 + [96] * 8
    assert [s.scale for s in specs] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8
    assert all(s.interpolation == "bicubic" and s.flip_p == 0.5 and s.jitter == (0.4, 0.4, 0.2, 0.1)
               and s.jitter_p == 0.8 and s.gray_p == 0.2 and s.blur_sigma == (0.1, 2.0) for s in specs)
    assert [s.blur_p for s in specs] == [1.0, 0.1] + [0.5] * 8
    assert [s.solarize_p for s in specs] == [0.0, 0.2] + [0.0] * 8
    assert [s.blur_p for s in data.dino_specs(32)] == [0.0] * 10  # CIFAR: no blur, as every recipe here


def test_solarize_only_on_byol_second_view():
    assert [s.solarize_p for s in data.byol_specs(32)] == [0.0, 0.2]  # BYOL Table 6
    t1, t2 = data.byol_transforms(32, MEAN, STD)
    sol = [[s.p for s in t.transforms if isinstance(s, v2.RandomSolarize)] for t in (t1, t2)]
    assert sol == [[], [0.2]]


def test_finetune_transform_is_random_and_normalized(img):
    torch.manual_seed(0)
    t = data.finetune_transform(32, MEAN, STD)
    a, b = t(img), t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and a.min() < 0 and not torch.equal(a, b)


def test_eval_transform_is_deterministic_center_crop():
    t = data.eval_transform(32, MEAN, STD)
    x = Image.new("RGB", (48, 64))
    x.paste((255, 255, 255), (0, 0, 48, 4))  # a white band at the top, cut off by the centre crop
    y = t(x)
    assert y.shape == (3, 32, 32) and torch.equal(y, t(x))
    assert torch.allclose(y, t(Image.new("RGB", (48, 64))))


def test_sample_loads_as_folder():
    train = data.build_dataset("folder", SAMPLE, "train")
    test = data.build_dataset("folder", SAMPLE, "test", transform=data.eval_transform(32, MEAN, STD))
    assert train.classes == CIFAR10_CLASSES == test.classes and data.num_classes(train) == 10
    assert [train.targets.count(c) for c in range(10)] == [100] * 10
    assert [test.targets.count(c) for c in range(10)] == [100] * 10
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0


def test_sample_is_real_labeled_data():
    def pixels(split):
        ds = data.build_dataset("folder", SAMPLE, split, transform=v2.PILToTensor())
        return torch.stack([x for x, _ in ds]).flatten(1).float(), torch.tensor(ds.targets)
    (xtr, ytr), (xte, yte) = pixels("train"), pixels("test")
    acc = (ytr[torch.cdist(xte, xtr).argmin(1)] == yte).float().mean().item()
    assert acc > 0.18  # raw-pixel 1-NN: 0.256 on this sample (about 0.35 on all of CIFAR-10); chance is 0.10


def test_val_folder_stands_in_for_test(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    ds = data.build_dataset("folder", tmp_path, "test")
    assert len(ds) == 2 and ds.classes == ["a", "b"] and Path(ds.root).name == "val"


def test_test_classes_must_match_train(tmp_path):
    # ImageFolder numbers classes by sorted folder name: a class missing from test/ would shift its labels
    for split, classes in (("train", "abc"), ("test", "ac")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    assert len(data.build_dataset("folder", tmp_path, "train")) == 3
    with pytest.raises(data.DataError, match=r"has classes \['a', 'c'\], but .*/train has \['a', 'b', 'c'\]"):
        data.build_dataset("folder", tmp_path, "test")


@pytest.mark.parametrize("layout, match", [
    (None, r"does not exist: expected .*/train/<class>/\*\.jpg and .*/test/<class>/\*\.jpg \(or val/\)"),
    (["train/a"], r"no test folder in .*: expected .*train/<class>/\*\.jpg"),
    (["train", "test"], r"Couldn't find any class folder .*expected"),
])
def test_folder_errors(tmp_path, layout, match):
    root = tmp_path / "data"
    for d in layout or []:
        (root / d).mkdir(parents=True)
    with pytest.raises(data.DataError, match=match) as e:
        data.build_dataset("folder", root, "test")
    assert isinstance(e.value, SystemExit) and "\n" not in str(e.value)


def test_torchvision_dataset_missing_without_download(tmp_path):
    for name, split in [("cifar10", "train"), ("cifar100", "test"), ("stl10", "train+unlabeled")]:
        with pytest.raises(data.DataError, match=rf"{name} not found in {tmp_path} \(--no-download given"):
            data.build_dataset(name, tmp_path, split, download=False)


@pytest.mark.needs_simclr_aug
@pytest.mark.parametrize("script", ["simclr", "moco", "byol", "swav", "eval_linear"])
def test_defaults_download_cifar10_and_say_one_line_offline(script, tmp_path, monkeypatch):
    """Catches a fresh machine's `python byol.py --epochs 100` not fetching CIFAR-10 by itself (--download
    off by default), a traceback instead of one line when there is no network, and the empty data/ and
    runs/<name> folders such a failed start used to leave behind."""
    urls = []

    def offline(request, *args, **kwargs):  # what urllib does without a network, after noting the address
        urls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    module = importlib.import_module(script)
    argv = ["--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    argv += ["--random-init", "--arch", "vit_mini", "--patch-size", "8", "--dataset", "cifar10"] \
        if script == "eval_linear" else ["--out", str(tmp_path / "run")]
    with pytest.raises(data.DataError, match=rf"downloading cifar10 to {tmp_path}/data failed .*Name or service "
                                             rf"not known.*without internet") as e:
        module.main(argv)
    assert "\n" not in str(e.value) and any("cifar-10-python.tar.gz" in u for u in urls)
    # a run that failed before its first epoch leaves neither an empty data folder nor an empty run folder
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists(), sorted(tmp_path.rglob("*"))
    urls.clear()
    with pytest.raises(data.DataError, match=r"not found in .* \(--no-download given"):
        module.main(argv + ["--no-download"])
    assert urls == []


def _download_in_process(rank, world, root, lost=False):
    """One torchrun process building CIFAR-10 with download=True; torchvision's class replaced by one that
    notes who downloads and fails to read an archive that is not complete yet. lost: the download leaves no
    archive (a full disk, another machine's folder), and the error each process gave is written down."""
    os.environ.update(LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)

    class FakeCIFAR10:
        def __init__(self, data_dir, train, transform=None, download=False):
            archive = Path(data_dir) / "archive"
            if download and not archive.exists():
                with open(Path(data_dir) / "downloads", "a") as f:
                    f.write(f"{rank}\n")
                time.sleep(1.0)  # a download takes a while
                if not lost:
                    archive.write_text("done")
            elif not archive.exists():
                raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
    torchvision.datasets.CIFAR10 = FakeCIFAR10
    try:
        data.build_dataset("cifar10", root, "train", download=True)
    except data.DataError as e:
        (Path(root) / f"error{rank}").write_text(str(e))
    dist.destroy_process_group()


def test_under_torchrun_one_process_per_machine_downloads(tmp_path):
    """Catches every torchrun process downloading the same archive into the same folder at once (a torn
    file), or a process reading it before the download finished."""
    torch.multiprocessing.spawn(_download_in_process, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "downloads").read_text() == "0\n"


def test_under_torchrun_a_waiting_process_does_not_blame_no_download(tmp_path):
    """Catches the processes that wait for another's download saying "--no-download given" (a flag nobody
    passed) when that download left nothing: they name the downloading process instead."""
    torch.multiprocessing.spawn(_download_in_process, args=(2, str(tmp_path), True), nprocs=2, join=True)
    message = (tmp_path / "error1").read_text()
    assert "this run's downloading process left no complete copy" in message and "no-download" not in message


@pytest.mark.needs_simclr_aug
def test_unreadable_image_is_one_line_naming_the_file(tmp_path):
    """Catches a corrupt or truncated file in a folder dataset surfacing as a loader worker's traceback (or
    not naming the file), on both data paths and with or without workers."""
    root = Path(small_folder(tmp_path / "data", train_per_class=3, test_per_class=1))
    good = sorted((root / "train" / "cat").iterdir())[0]
    tf = data.simclr_transform(32, MEAN, STD)
    cases = [(root / "train" / "bird" / "notes.jpg", b"not an image", "not an image format PIL knows"),
             (root / "train" / "dog" / "cut.jpg", good.read_bytes()[:300], "runcated")]  # PIL: "Truncated ..."
    for bad, content, why in cases:
        bad.write_bytes(content)
        ds = data.build_dataset("folder", root, "train", tf)
        for workers in (0, 2):
            with pytest.raises(data.DataError) as e:
                for _ in data.build_loader(ds, 8, workers, train=True):
                    pass
            assert str(e.value).startswith(f"cannot read image {bad} (") and why in str(e.value), str(e.value)
            assert "\n" not in str(e.value)
        with pytest.raises(data.DataError, match=rf"cannot read image {bad} \(.*{why}"):
            data.build_device_loader(ds, [data.simclr_spec(32)] * 2, MEAN, STD, 8, "cpu")
        bad.unlink()
    ds = data.build_dataset("folder", root, "train", tf)
    assert sum(1 for _ in data.build_loader(ds, 8, 2, train=True)) == 30 // 8  # readable again


def test_training_script_stops_on_an_unreadable_image_with_one_line(tmp_path):
    """Catches the message being lost on the way out of a training script (a worker's traceback instead)."""
    root = Path(small_folder(tmp_path / "data", train_per_class=3, test_per_class=1))
    (root / "train" / "frog" / "x.jpg").write_bytes(b"GIF89a garbage")
    r = subprocess.run([sys.executable, str(ROOT / "byol.py"), "--dataset", "folder", "--data-dir", str(root),
                        "--arch", "vit_mini", "--patch-size", "8", "--batch-size", "8", "--workers", "2",
                        "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last.startswith(f"cannot read image {root}/train/frog/x.jpg ("), r.stderr[-2000:]


def test_bad_name_or_split():
    with pytest.raises(data.DataError, match="has no split 'unlabeled'"):
        data.build_dataset("cifar10", "x", "unlabeled")
    with pytest.raises(data.DataError, match="unknown dataset 'imagenet'"):
        data.build_dataset("imagenet", "x", "train")


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--show", "simclr", "--data-dir",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "v.png")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


@pytest.mark.needs_simclr_aug  # SwAV's crops are SimCLR's recipe
def test_show_writes_a_grid(tmp_path):
    out = tmp_path / "v.png"
    data.show("swav", out, rows=3)
    w, h = Image.open(out).size
    # 4x zoom of 9 columns x 3 rows of 32 px + 2 px gaps, under the header naming the columns
    assert (w, h) == (4 * (9 * 34 + 2), 4 * (3 * 34 + 2) + data.SHOW_HEADER)


@pytest.mark.needs_simclr_aug
def test_loader_batches():
    views = data.MultiView(data.simclr_transform(32, MEAN, STD), n=2)
    train = data.build_loader(data.build_dataset("folder", SAMPLE, "train", views), 64, workers=0, train=True)
    batches = list(train)
    assert len(batches) == 1000 // 64 == 15  # the last 40 images dropped
    (v1, v2_), y = batches[0]
    assert v1.shape == v2_.shape == (64, 3, 32, 32) and y.shape == (64,)
    assert all(b[1].shape == (64,) for b in batches)
    assert len(set(y.tolist())) > 1  # shuffled: the tree is sorted by class
    test = data.build_loader(data.build_dataset("folder", SAMPLE, "test", data.eval_transform(32, MEAN, STD)),
                             64, workers=0, train=False)
    ys = torch.cat([y for _, y in test])
    assert len(ys) == 1000 and torch.equal(ys, ys.sort().values)  # everything, in order


@pytest.mark.needs_simclr_aug
def test_views_depend_on_seed_epoch_and_image_only():
    """Catches augmentations that change with the number of loader workers (--resume and torchrun would then
    see other views), or that repeat across epochs or seeds."""
    ds = data.build_dataset("folder", SAMPLE, "test", data.simclr_transform(32, MEAN, STD))

    def epoch(workers, epoch=0, seed=0):
        loader = data.build_loader(ds, 100, workers=workers, train=True, seed=seed)
        data.set_epoch(loader, epoch)
        return torch.cat([x for x, _ in loader])

    a = epoch(0)
    assert a.shape == (1000, 3, 32, 32) and torch.equal(a, epoch(2))
    assert not torch.equal(a, epoch(0, epoch=1)) and not torch.equal(a, epoch(0, seed=1))
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    data.SeededViews(ds)[0]                # drawing views in this process leaves its random stream alone
    assert torch.equal(torch.rand(3), before)


def test_distributed_sampler_shards_and_reshuffles(tmp_path):
    """Catches a train loader that does not shard under torch.distributed, repeats its order every epoch, or
    ignores the seed; and eval loaders that are not split over processes."""
    ds = data.build_dataset("folder", SAMPLE, "test")
    one = data.build_loader(ds, 10, workers=0, train=True)  # one process: a DistributedSampler of one replica
    first = list(one.sampler)
    data.set_epoch(one, 1)
    assert sorted(first) == list(range(1000)) and list(one.sampler) != first
    assert first != list(data.build_loader(ds, 10, workers=0, train=True, seed=1).sampler)
    assert data.build_loader(ds, 10, workers=0, train=False).sampler.__class__.__name__ == "SequentialSampler"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = data.build_loader(ds, 10, workers=0, train=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.drop_last
        assert isinstance(data.build_loader(ds, 10, workers=0, train=False).sampler, data.Shard)
    finally:
        dist.destroy_process_group()
    shards = [list(data.Shard(7, r, 2)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]


# ---- augmentations, measured on images against the papers' values ----

PAPER = {  # crop area and aspect ranges, flip p, jitter (brightness and hue strength, p), grayscale p, solarize p
    # BYOL Table 6: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (p 0.8), grayscale 0.2, solarize 0 / 0.2
    "byol_1": dict(scale=(0.08, 1.0), flip=0.5, brightness=0.4, hue=0.1, jitter_p=0.8, gray_p=0.2, solarize_p=0.0),
    "byol_2": dict(scale=(0.08, 1.0), flip=0.5, brightness=0.4, hue=0.1, jitter_p=0.8, gray_p=0.2, solarize_p=0.2),
}  # SimCLR's values, and SwAV's (SimCLR's recipe), are exercise 1's answer: the course's grading tests hold them
VIEWS = ["simclr", "byol_1", "byol_2", "swav_global", "swav_small"]  # every paper view data.py makes


PATHS = ["pil", "device"]  # data.py's two ways to make views: PIL per image, and batched (--aug batched, the default)


def paper_transform(name):
    return {"simclr": lambda: data.simclr_transform(32, MEAN, STD),
            "byol_1": lambda: data.byol_transforms(32, MEAN, STD)[0],
            "byol_2": lambda: data.byol_transforms(32, MEAN, STD)[1],
            "swav_global": lambda: data.multicrop_transform(32, MEAN, STD).transforms[0],
            "swav_small": lambda: data.multicrop_transform(32, MEAN, STD).transforms[-1]}[name]()


def paper_spec(name):
    return {"simclr": lambda: data.simclr_spec(32), "byol_1": lambda: data.byol_specs(32)[0],
            "byol_2": lambda: data.byol_specs(32)[1], "swav_global": lambda: data.multicrop_specs(32)[0],
            "swav_small": lambda: data.multicrop_specs(32)[-1]}[name]()


def unnormalize(x):
    return x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]


def draw_views(name, path, image, n=1000, geometric=False):
    """n views (n, 3, s, s) of one image (PIL, or a float tv_tensors.Image) by the paper view `name` of either
    path, normalized; geometric: its crop and flip only, on the image's own values."""
    if path == "pil":
        t = paper_transform(name)
        if geometric:
            geometric_ops = (v2.RandomResizedCrop, v2.RandomHorizontalFlip)
            t = v2.Compose([op for op in t.transforms if isinstance(op, geometric_ops)])
        torch.manual_seed(0)
        return torch.stack([t(image) for _ in range(n)])
    spec, mean, std = paper_spec(name), MEAN, STD
    if geometric:
        spec = dataclasses.replace(spec, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0)
        mean, std = (0, 0, 0), (1, 1, 1)
    x = image if isinstance(image, torch.Tensor) else v2.functional.pil_to_tensor(image)  # (3, H, W)
    indices = torch.arange(n).split(100)  # 100 at a time: 1000 float images of 256 px would take 786 MB
    return torch.cat([data.device_views(x.expand(len(i), -1, -1, -1), i, [spec], mean, std)[0] for i in indices])


@functools.cache
def crop_measurements(name, path):
    """Area and aspect (w / h) of the crop box, as fractions of the image, and flipped or not, of 1000 views:
    read off a coordinate image (pixel value = its x or y position) through the view's geometric ops."""
    side = 256
    ys, xs = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    out = draw_views(name, path, tv_tensors.Image(torch.stack([xs, ys, torch.zeros_like(xs)])), geometric=True)
    s = out.shape[-1]                                                # (1000, 3, s, s), s the view's side
    w = (out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2))) * s / (s - 1)  # crop width / image width
    h = (out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2))) * s / (s - 1)
    return w * h, w / h, out[:, 0, 0, 0] > out[:, 0, 0, -1]


@functools.cache
def colour_measurements(name, path):
    """What 1000 views do to uniform images (which crop, flip and blur leave alone): brightness factors on grey,
    hue shifts (in turns) and grayscale on dark red, solarization on bright grey."""
    def pixel(rgb):  # (1000, 3): the top-left pixel of each view, un-normalized
        return unnormalize(draw_views(name, path, Image.new("RGB", (8, 8), rgb)))[:, :, 0, 0]
    # grey: contrast, saturation and hue leave it; brightness b in [1 - s, 1 + s] scales it
    factors = pixel((128, 128, 128))[:, 0] / (128 / 255)
    # dark red: hue shifts of up to the hue strength, grayscale makes r = g = b; dark enough that BYOL's
    # solarization (of values >= 0.5), which would turn the hue, never applies
    red = pixel((80, 20, 16))
    gray = ((red[:, 0] - red[:, 1]).abs() < 1e-3) & ((red[:, 1] - red[:, 2]).abs() < 1e-3)
    base_hue = colorsys.rgb_to_hsv(80 / 255, 20 / 255, 16 / 255)[0]
    shifts = torch.tensor([(colorsys.rgb_to_hsv(*rgb.clamp(0, 1).tolist())[0] - base_hue + 0.5) % 1 - 0.5
                           for rgb in red[~gray]])
    # bright grey (230): never below 0.5 after brightness 0.6 (0.54), always below 0.5 once solarized
    solarized = pixel((230, 230, 230))[:, 0] < 0.5
    return factors, gray, shifts, solarized


def inception_crop_mean_area(scale, ratio=(3 / 4, 4 / 3), n=20000):
    """Mean area of the Inception-style random crop (Szegedy et al. 2015, as SimCLR App. A describes it): area
    uniform in `scale`, log aspect uniform in `ratio`, redrawn (up to 10 times) until the box fits the image,
    else the whole image. Largest crops often do not fit, so the mean is below the middle of `scale`."""
    rng, total = random.Random(0), 0.0
    for _ in range(n):
        for _ in range(10):
            area, aspect = rng.uniform(*scale), math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if w <= 1 and h <= 1:
                break
        else:
            area = 1.0
        total += area
    return total / n


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(PAPER))
def test_crop_and_flip_statistics(name, path):
    """Catches a crop scale or flip that is not the paper's (e.g. crops of (0.5, 1), no flip), on either path."""
    check_crop_and_flip(name, path, PAPER[name])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(PAPER))
def test_colour_statistics(name, path):
    """Catches a colour jitter weaker or stronger than the paper's (e.g. half of it), or another probability
    of jitter, grayscale or solarization, on either path: measured on uniform images."""
    check_colour(name, path, PAPER[name])


def check_crop_and_flip(name, path, want):
    """The crop areas, aspects and flips of 1000 views of the paper view `name` by `path` are those of `want`."""
    areas, aspects, flips = crop_measurements(name, path)
    lo, hi = want["scale"]
    assert lo - 0.02 < areas.min() < lo + 0.02 and hi - 0.05 < areas.max() < hi + 0.02, (areas.min(), areas.max())
    assert abs(areas.mean().item() - inception_crop_mean_area(want["scale"])) < 0.03 * hi, areas.mean()
    assert 0.72 < aspects.min() < 0.78 and 1.28 < aspects.max() < 1.38  # (3/4, 4/3), the default ratio
    assert abs(flips.float().mean().item() - want["flip"]) < 0.05


def check_colour(name, path, want):
    """The brightness factors, hue shifts and jitter, grayscale and solarization rates of 1000 views of the paper
    view `name` by `path` are those of `want`."""
    factors, gray, shifts, solarized = colour_measurements(name, path)
    assert abs(factors.min().item() - (1 - want["brightness"])) < 0.03, factors.min()
    assert abs(factors.max().item() - (1 + want["brightness"])) < 0.03, factors.max()
    untouched = (factors - 1).abs().lt(0.004).float().mean().item()  # jitter not applied (p 0.8): 20%
    assert abs(untouched - (1 - want["jitter_p"])) < 0.04, untouched
    assert abs(gray.float().mean().item() - want["gray_p"]) < 0.04
    # (PIL turns hue in 1/256 steps, coarse for the weakly saturated colours of strong jitter: 10% + 0.01)
    assert abs(shifts.abs().max().item() - want["hue"]) < 0.1 * want["hue"] + 0.01, shifts.abs().max()
    if want["brightness"] < 0.45:
        assert abs(solarized.float().mean().item() - want["solarize_p"]) < 0.04


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs. Values rounded to
    1e-3 first: an atom (the untouched images' factor 1) lands 1 ulp apart on the two paths."""
    a, b = a.round(decimals=3), b.round(decimals=3)
    x = torch.cat([a, b]).sort().values
    return max(abs(torch.searchsorted(a.sort().values, x, right=True) / len(a)
                   - torch.searchsorted(b.sort().values, x, right=True) / len(b))).item()


@pytest.mark.needs_simclr_aug
@pytest.mark.parametrize("name", VIEWS)
def test_device_path_draws_what_the_pil_path_draws(name):
    """Catches a device path whose distributions drift from the PIL path's where the paper checks above are loose:
    crop area and aspect, brightness factor and hue shift distributions side by side (KS distance; 0.087 is
    the 0.1% critical value for 1000 against 1000), flip, jitter, grayscale and solarization rates."""
    (areas, aspects, flips), (areas_d, aspects_d, flips_d) = (crop_measurements(name, path) for path in PATHS)
    (factors, gray, shifts, sol), (factors_d, gray_d, shifts_d, sol_d) = (colour_measurements(name, path)
                                                                          for path in PATHS)
    for a, b in ((areas, areas_d), (aspects, aspects_d), (factors, factors_d), (shifts.abs(), shifts_d.abs())):
        assert ks_distance(a, b) < 0.087, ks_distance(a, b)
    for a, b in ((flips, flips_d), ((factors - 1).abs() < 0.004, (factors_d - 1).abs() < 0.004), (gray, gray_d),
                 (sol, sol_d)):
        assert abs(a.float().mean() - b.float().mean()) < 0.06, (a.float().mean(), b.float().mean())


@pytest.mark.needs_simclr_aug
def test_show_draws_each_scripts_default_recipe():
    """Catches `data.py --show` (and the study's views figures) drawing another recipe than a training script
    trains on by default: another colour strength, number or size of small crops, or pair."""
    import simclr
    import swav
    default = lambda module, flag: module.get_args_parser().get_default(flag)  # noqa: E731
    assert data.method_specs("simclr", 32) == [data.simclr_spec(32, default(simclr, "color_strength"))] * 2
    assert data.method_specs("moco", 32) == data.method_specs("byol", 32) == list(data.byol_specs(32))
    # SwAV's and DINO's small crops at the default arch, ViT-Tiny/4 (16 px crops: 4x4 patches, the papers' counts)
    assert (default(swav, "arch"), default(swav, "patch_size")) == ("vit_tiny", 4)
    assert default(swav, "small_crop_size") is None
    assert data.small_crop_side(32, 4) == 16  # what the default None becomes
    assert data.method_specs("swav", 32) == data.multicrop_specs(
        32, n_global=2, n_local=6, local_size=16, strength=default(swav, "color_strength"))
    import dino
    assert (default(dino, "arch"), default(dino, "patch_size")) == ("vit_tiny", 4)
    assert default(dino, "small_crop_size") is None
    assert data.small_crop_side(32, 4) == 16  # what the default None becomes
    assert data.method_specs("dino", 32) == data.dino_specs(32, n_local=8, local_size=16)

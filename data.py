"""Datasets, per-method augmentations (SimCLR, BYOL/MoCo v3, SwAV multi-crop) and loaders.

- `build_dataset(name, data_dir, split, transform)`: cifar10, cifar100, stl10 (torchvision) or `folder`
  (an ImageFolder tree `<dir>/train/<class>/*.jpg` + `<dir>/test/` or `val/`), yielding (transform(img), label).
  Every dataset has `.classes` (names in label order); `num_classes(ds)` is `len(ds.classes)`. torchvision's
  are fetched when missing (download=True; under torchrun by one process per machine); a folder's file that
  PIL cannot decode stops the loaders with one line naming it (`read_image`, `UnreadableImage`).
- One recipe per paper, written once as data (`ViewSpec`s: `simclr_spec`, `byol_specs`, `multicrop_specs`,
  `dino_specs`),
  literal values in the paper's order, each naming its table or section. Each recipe is built into two paths:
  * batched (`device_view`): every view of a whole batch at once, each image with its own random draws, made
    on the training device (a GPU, or the CPU) from the training set decoded once into one uint8 tensor;
  * PIL (`pil_transform`; `simclr_transform`, `byol_transforms`, `multicrop_transform`): a transform maps a
    PIL image to a normalized float tensor (3, H, W), in loader workers; `MultiView` turns transforms into the
    list of views a method trains on, which the default collate stacks into a list of (B, 3, H, W).
- `build_train_loader(dataset, specs, ..., aug)`: every training script's loader, by its --aug: "batched"
  (`build_device_loader`), "pil" (`build_loader`), or "auto" (the default: batched where the decoded set fits
  BATCHED_BUDGET, 2 GB, and its images have one size; PIL workers for larger sets such as ImageNet). It prints
  which path a run takes and why. A folder's images are decoded once: `decode_all` keeps them in
  `.decoded-<split>.pt` beside the split folder for the next run, and decodes again when a file changes.
- `build_loader(dataset, batch_size, workers, train, seed)`: per-image augmentation seeds, the shuffle
  (a DistributedSampler, one replica in one process), drop_last; `set_epoch(loader, epoch)` every epoch.
  `build_device_loader(dataset, specs, mean, std, batch_size, device, seed)` yields the same batches of the
  same images, with the views made on `device`.
- `build_eval_loader(dataset, img_size, mean, std, ...)`: every script's evaluation loader (k-NN, probes),
  un-augmented and in order, from the decoded set where no resizing is needed (bit for bit the PIL path's).

Why batched is the default: on the 2-core CPU of the README's benchmarks it trains every method faster end to end
than PIL loader workers (`python benchmarks/method_speed.py --sides ours,ours-pil`), and on a GPU PIL workers
cannot keep up at CIFAR sizes.
On the PIL path images are augmented as PIL images: at CIFAR's 32 px the PIL kernels beat the same
torchvision.transforms.v2 ops on uint8 tensors (which spend their time in per-op overhead, hue above all) by
about 1.2x on one core; `python benchmarks/augment_speed.py` measures it, and the batched path against both.
v2 dispatches on the input type, so feeding these same transforms a uint8 tensor (torchvision.io.decode_image)
runs the tensor kernels instead.

Look at what a method trains on (rows: images; columns: the original, then the views):
    python data.py --show simclr --out views.png
    python data.py --show swav --out views.png --dataset cifar10 --data-dir data   # CIFAR-10, fetched into ./data
    python data.py --show byol --out views.png --aug pil      # the PIL path's views (default: the batched path's)
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2
from tqdm import tqdm

SAMPLE_DIR = Path(__file__).resolve().parent / "tests" / "data_sample"  # shipped CIFAR-10 sample, 1000/1000
_SAMPLE_HINT = (f"such as the shipped CIFAR-10 sample {os.path.relpath(SAMPLE_DIR)} (the README's demo: "
                f"python simclr.py --dataset folder --data-dir {os.path.relpath(SAMPLE_DIR)} --arch vit_mini ...)")


class DataError(SystemExit):
    """Missing or malformed data. A SystemExit, so a script that does not catch it prints this one line
    and exits with status 1 instead of showing a traceback: the fix is in the message, not in the code."""


# ---- the command line: one parser recipe and one set of value types for every script ----

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help of every script: the description and the examples as written (continued example lines print line
    for line), every option with its default once: "(default: ...)" is added unless the help states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or action.required or "%(default)" in text or "default:" in text.lower():
            return text
        return text + " (default: %(default)s)"


def _rank():
    """This process's rank under torchrun (its RANK variable), 0 in a plain process."""
    return int(os.environ.get("RANK", "0") or 0)


# Under torchrun the other processes wait this long before they exit quietly, so that rank 0's failure (with its
# message) is the one torchrun sees first: torchrun stops the rest as soon as one process fails, and reports the
# earliest failure as the root cause. Without the wait, on a busy machine a quiet rank could end first and the
# report would say "To enable traceback see ..." instead of the message. It costs nothing when rank 0 fails too.
QUIET_RANK_WAIT_S = 10


def _quiet_exit(status):
    """A process other than rank 0 ends without a word, after rank 0 has had the time to fail first."""
    time.sleep(QUIET_RANK_WAIT_S)
    sys.exit(status)


def _torchrun_error_file(line):
    """Under torchrun: `line` as the error file torchrun reads (TORCHELASTIC_ERROR_FILE), so that the failure
    report it prints after the processes exit shows it as the root cause, instead of 'To enable traceback see'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage error (usage, then one line naming the flag and the value) comes from one
    process under torchrun: the other processes exit with the same status 2, quietly."""

    def error(self, message):
        if _rank() != 0:
            _quiet_exit(2)
        _torchrun_error_file(f"{self.prog}: error: {message}")
        super().error(message)


class _PrintDoc(argparse.Action):
    def __init__(self, option_strings, dest, doc, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)
        self.doc = doc

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.doc)
        parser.exit()


def script_parser(doc, path):
    """The parser of the script at `path` whose module docstring is `doc`: usage with the script's name; as
    description the docstring's first paragraph and its "Paper:" paragraph; after the options, its paragraphs of
    example commands (lines indented 4 spaces that start with python or torchrun) as written; --help-paper prints
    the whole docstring (the method, the differences from the paper) and exits, where there is a paper."""
    paragraphs = doc.strip("\n").split("\n\n")
    description = paragraphs[:1] + [p for p in paragraphs[1:2] if p.startswith("Paper:")]
    examples = [p for p in paragraphs if re.search(r"^    (python|torchrun) ", p, re.MULTILINE)]
    examples = [p if not p.startswith(" ") else "Examples:\n" + p for p in examples]
    parser = ArgumentParser(prog=os.path.basename(path), description="\n\n".join(description),
                            epilog="\n\n".join(examples), formatter_class=HelpFormatter)
    if len(description) == 2:
        parser.add_argument("--help-paper", action=_PrintDoc, doc=doc,
                            help="print the module docstring (the method, how to run it, the differences from the "
                                 "paper) and exit")
    return parser


@contextlib.contextmanager
def one_voice():
    """Around a script's main(): under torchrun an error that ends the run (a SystemExit with a message: a
    DataError, a refused setting, Ctrl-C's note) is printed by rank 0 alone, and given to torchrun's failure
    report as its root cause; the other processes exit with status 1, quietly. In one process: nothing changes."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            if _rank() != 0:
                _quiet_exit(1)
            _torchrun_error_file(e.code.strip().splitlines()[-1])
        raise


def run_script(main, get_args_parser):
    """A training script's entry point (`python simclr.py ...`, also under torchrun): main() inside one_voice, and
    Ctrl-C ended by one line instead of a traceback from wherever the loop was: whether --out's checkpoint holds a
    finished epoch and how to continue from it."""
    with one_voice():
        try:
            main()
        except KeyboardInterrupt:
            ckpt_path = os.path.join(get_args_parser().parse_args().out, "checkpoint.pt")
            raise SystemExit(f"\ninterrupted: {ckpt_path} holds the last finished epoch; run the same command "
                             f"with --resume to continue" if os.path.exists(ckpt_path) else
                             "\ninterrupted in the first epoch")


def _checked(kind, ok, what):
    """An argparse type: text -> kind(text) where ok(value), else argparse's one line naming the flag and the text
    as typed: "argument --lr: -0.1 is not a positive number"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what
    return parse


def int_range(low, high):
    return _checked(int, lambda v: low <= v <= high, f"an integer from {low} to {high}")


# nan fails every comparison, so no float type below lets it through; inf is refused as not finite
positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a positive number")
nonneg_float = _checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
probability = _checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
fraction = _checked(float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (0 and 1 excluded)")
label_fraction = _checked(float, lambda v: 0 < v <= 1, "a fraction above 0 and at most 1")  # 1: every label
holdout_fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction from 0 to 1 (1 excluded)")  # 0: none held out
epoch_count = int_range(1, 100_000)    # epochs to train: a typo's 1000000000 would run for ever, not fail
seed_int = int_range(0, 2 ** 32 - 1)   # the views hash it modulo 2**32 (uniforms): a larger one repeats a smaller one's
pixel_side = int_range(1, 4096)        # image, crop and patch sides, in pixels: 18x a ViT's usual 224
width_int = int_range(1, 2 ** 18)      # head widths, outputs, prototypes: 4x DINO's K of 65,536
worker_count = int_range(0, 256)       # loader processes: a huge count would start that many processes
crop_count = int_range(0, 64)          # multi-crop's small crops per image: the papers use 6 to 10
queue_size = int_range(0, 2 ** 20)     # features kept as extra negatives or codes: 16x MoCo's 65,536
strength = _checked(float, lambda v: 0 <= v <= 2.5,
                    "a number from 0 to 2.5")  # SimCLR's hue jitter is 0.2 s: at most half a turn


def device_name(text):
    """--device as an argparse type: auto, cpu, mps, cuda or cuda:N, refused in one line where this machine does
    not have it (torch would say so later, in a traceback)."""
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text} is not a device: auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch can use "
                                         f"(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: this machine has no MPS (Apple GPU) that torch can use; "
                                         f"use --device cpu")
    return text


# Per-channel mean and std of the training pixels, in [0, 1] units.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # what timm / DeiT weights expect
MEAN_STD = {
    # over the 50k training images of the official binary release (the often copied (0.2023, 0.1994, 0.2010)
    # is the mean of per-image stds, not the pixel std)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),  # 50k CIFAR-100 training images
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),  # commonly quoted, labeled train split
    "folder": IMAGENET_MEAN_STD,  # the usual default for any images
}


# ---- datasets ----

def build_dataset(name, data_dir, split, transform=None, download=False):
    """(transform(img), label) pairs. split: train | test, and for stl10 also unlabeled | train+unlabeled
    (its 100k unlabeled images, label -1, are what STL-10 is for: pretraining)."""
    data_dir = str(data_dir)
    tv = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
          "stl10": torchvision.datasets.STL10}
    if name not in (*tv, "folder"):
        raise DataError(f"unknown dataset {name!r}: choose cifar10, cifar100, stl10 or folder")
    splits = ("train", "test", "unlabeled", "train+unlabeled") if name == "stl10" else ("train", "test")
    if split not in splits:
        raise DataError(f"dataset {name!r} has no split {split!r}; it has {', '.join(splits)}")
    if name == "folder":
        return _image_folder(data_dir, split, transform)
    where = {"split": split} if name == "stl10" else {"train": split == "train"}
    # under torchrun one process per machine downloads (the archive is one file), the others wait for it
    shared = download and dist.is_available() and dist.is_initialized()
    fetch = download and (not shared or int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0)
    created = fetch and not os.path.exists(data_dir)  # a failed download then leaves no empty folder behind
    try:
        if shared and not fetch:
            dist.barrier()
        dataset = tv[name](data_dir, **where, transform=transform, download=fetch)
        if shared and fetch:
            dist.barrier()
        return dataset
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        how = ("--no-download given: drop it to fetch it there (needs internet)" if not download else
               "this run's downloading process left no complete copy there" if not fetch else
               f"downloaded, but incomplete: delete {data_dir} and run again")
        raise DataError(f"{name} not found in {data_dir} ({how}); or use --dataset folder --data-dir "
                        f"<ImageFolder tree>, {_SAMPLE_HINT}") from None
    except OSError as e:  # no network, refused connection, full disk, ...
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise DataError(f"downloading {name} to {data_dir} failed ({e}); without internet use "
                        f"--dataset folder --data-dir <ImageFolder tree>, {_SAMPLE_HINT}") from None


def _image_folder(data_dir, split, transform):
    expected = f"expected {data_dir}/train/<class>/*.jpg and {data_dir}/test/<class>/*.jpg (or val/)"
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist: {expected}")
    sub = [os.path.join(data_dir, s) for s in ((split,) if split == "train" else ("test", "val"))]
    sub = [s for s in sub if os.path.isdir(s)]
    if not sub:
        raise DataError(f"no {split} folder in {data_dir}: {expected}")
    try:
        ds = torchvision.datasets.ImageFolder(sub[0], transform=transform, loader=read_image)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise DataError(f"{e} ({expected})") from None
    if split != "train" and os.path.isdir(os.path.join(data_dir, "train")):
        # labels are class-folder indices: another set of folders in test/ would silently shift them
        train_classes = ds.find_classes(os.path.join(data_dir, "train"))[0]  # ImageFolder's own rule
        if ds.classes != train_classes:
            raise DataError(f"{sub[0]} has classes {ds.classes}, but {data_dir}/train has {train_classes}: "
                            f"both need the same class folders")
    return ds


class UnreadableImage(OSError):
    """An image file that PIL cannot decode. Raised in a loader worker, it reaches the main process re-wrapped
    around the worker's traceback; the loaders of this module turn it back into a one-line DataError."""


def read_image(path):
    """An ImageFolder's loader: the file as an RGB PIL image (grayscale and RGBA files converted, as
    torchvision's default loader does), or UnreadableImage naming the file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")  # convert() decodes the whole file: truncation shows here
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError, truncated data, bad headers
        why = "not an image format PIL knows" if isinstance(e, UnidentifiedImageError) else e
        raise UnreadableImage(f"cannot read image {path} ({why}): delete or replace the file") from None


def _unreadable(e):
    """The one-line DataError of an UnreadableImage, from a worker (the message ends with the original
    exception's line) or from this process."""
    line = str(e).strip().splitlines()[-1]
    return DataError(line[line.find("cannot read image"):])


def num_classes(dataset):
    return len(dataset.classes)


def labels(dataset):
    """(N,) int64 labels of a build_dataset dataset or a Subset of one, read without decoding an image."""
    base, indices = _base(dataset)
    every = torch.as_tensor(base.targets if hasattr(base, "targets") else base.labels).long()
    return every if indices is None else every[torch.as_tensor(indices, dtype=torch.long)]


# ---- augmentations ----

def _to_normalized(mean, std):
    # PIL or uint8 (3, H, W) -> float32 in [0, 1] -> (x - mean) / std
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _blur_kernel(size):
    # SimCLR App. A: kernel 10% of the image side; BYOL's 23 px at 224. Odd for a centred kernel: 32 -> 3.
    return int(0.1 * size) // 2 * 2 + 1


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation recipe, written once per paper below and built into both pipelines: the PIL one
    (`pil_transform`, per image in loader workers) and the batched one on the device (`device_view`, --aug).
    The ops run in this order, each on an image with its probability (an op of probability 0 is left out)."""
    size: int                             # output side
    scale: tuple = (0.08, 1.0)            # random resized crop: area, a fraction of the image's
    ratio: tuple = (3 / 4, 4 / 3)         # ... and aspect (w / h), log-uniform
    interpolation: str = "bilinear"       # or "bicubic"
    flip_p: float = 0.5                   # horizontal flip
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)  # colour jitter strengths (brightness, contrast, saturation, hue), as
    jitter_p: float = 0.0                 # v2.ColorJitter takes them: factors 1 +- s, hue +- s turns, random order
    gray_p: float = 0.0                   # grayscale (colour drop)
    blur_p: float = 0.0                   # Gaussian blur of kernel side blur_kernel, sigma uniform in blur_sigma
    blur_kernel: int = 3
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0               # x -> 1 - x where x >= 0.5


def simclr_spec(img_size, strength=0.5):
    """SimCLR's view (Chen et al. 2020, arXiv:2002.05709, App. A) as a ViewSpec of side img_size: the appendix's
    random crop with resize, horizontal flip, colour distortion (its pseudocode's color_distort: colour jitter of
    strength s = `strength`, then colour drop) and Gaussian blur, each with the probability, range and strength the
    appendix gives. s is 1.0 on ImageNet and 0.5 on CIFAR-10 (App. B.9). What the paper leaves to its code: the
    resize is bicubic (the reference code's crop_and_resize), the blur kernel is _blur_kernel(img_size), and blur
    is used from 64 px up only (App. B.9 drops it on 32 px CIFAR; STL-10's 96 px keeps it). No solarization."""
    s = strength
    return ViewSpec(
        img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),  # area 8-100%, aspect ratio 3/4-4/3
        interpolation="bicubic",                              # the reference code's crop_and_resize
        flip_p=0.5,
        # "color_distort": jitter (brightness, contrast, saturation, hue) = (0.8s, 0.8s, 0.8s, 0.2s) in random
        # order with p 0.8, then color drop (grayscale) with p 0.2
        jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, gray_p=0.2,
        blur_p=0.5 if img_size >= 64 else 0.0, blur_kernel=_blur_kernel(img_size), blur_sigma=(0.1, 2.0),
    )


def byol_specs(img_size):
    """BYOL (Grill et al. 2020, arXiv:2006.07733) App. B, Table 6: the asymmetric pair (t1, t2), which differ
    only in blur (p 1.0 / 0.1) and solarization (p 0.0 / 0.2). MoCo v3 (arXiv:2104.02057) uses the same
    pair. The blur kernel is 10% of the side, made odd: 23 px at 224 as in BYOL. Below 64 px there is no
    blur, as in SimCLR's CIFAR recipe (App. B.9) and the CIFAR configs of solo-learn (asymmetric.yaml) and
    lightly's benchmark: a 3 px kernel with sigma up to 2 wipes out most of a 32 px image."""
    def view(blur_p, solarize_p):
        return ViewSpec(
            img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic",  # bicubic resize
            flip_p=0.5,
            jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,  # brightness, contrast, saturation, hue
            gray_p=0.2,
            blur_p=blur_p if img_size >= 64 else 0.0, blur_kernel=_blur_kernel(img_size), blur_sigma=(0.1, 2.0),
            solarize_p=solarize_p,
        )
    return view(blur_p=1.0, solarize_p=0.0), view(blur_p=0.1, solarize_p=0.2)


def multicrop_specs(img_size, n_global=2, n_local=6, local_size=None, global_scale=(0.14, 1.0),
                    local_scale=(0.05, 0.14), strength=1.0):
    """SwAV (Caron et al. 2020, arXiv:2006.09882) Sec. 3.2 multi-crop: n_global crops at img_size (area
    global_scale) then n_local small crops at local_size (area local_scale); the paper's 2x224 + 6x96 is
    multicrop_specs(224, local_size=96). local_size defaults to img_size // 2 (32 -> 16 px; patch 4
    divides both). Each crop is SimCLR's view (simclr_spec) at colour strength s with the crop's own size and
    area, resized bilinearly: main_swav.py takes SimCLR's flip, colour distortion and blur as they are (s = 1.0
    there; SimCLR's CIFAR-10 value is 0.5) and torchvision's default resize."""
    local_size = local_size or img_size // 2

    def crop(size, scale):
        return dataclasses.replace(simclr_spec(size, strength), scale=scale,
                                   interpolation="bilinear")  # torchvision's default, as in main_swav.py
    return [crop(img_size, global_scale)] * n_global + [crop(local_size, local_scale)] * n_local


def small_crop_side(img_size, patch_size):
    """The multi-crop papers' small crop for a global crop of img_size: 96/224 of its side (SwAV's and DINO's 96 px
    crops of 224 px images) rounded to a multiple of patch_size, raised to 4x4 patches if it falls short (their
    96 px crops are 6x6 patches of 16). 16 px at 32 px with patch 4 (13.7 rounds to 12, raised to 16), 32 px at
    32 px with patch 8 (no longer small: the method files then default to no small crops), 96 at 224 with 16."""
    return patch_size * max(4, round(img_size * 96 / 224 / patch_size))


def dino_specs(img_size, n_local=8, local_size=None, global_scale=None, local_scale=(0.05, 0.4)):
    """DINO (Caron et al. 2021, arXiv:2104.14294) App. / main_dino.py's DataAugmentationDINO: BYOL's asymmetric
    pair as the two global crops (blur p 1.0 / 0.1, solarization p 0 / 0.2; bicubic, flip, jitter (0.4, 0.4,
    0.2, 0.1) p 0.8, grayscale p 0.2), of area global_scale instead of 0.08-1, then n_local small crops at
    local_size (default img_size // 2) of area local_scale (0.05-0.4), each with blur p 0.5 and the same flip,
    jitter and grayscale. global_scale defaults to main_dino.py's 0.4-1 with small crops and to 0.14-1 without
    them (the reference README's advice for a run without multi-crop). The paper's 2x224 + 8x96 is
    dino_specs(224, local_size=96). Blur only from 64 px, as in every recipe here."""
    local_size = local_size or img_size // 2
    global_scale = global_scale or ((0.4, 1.0) if n_local else (0.14, 1.0))
    global1, global2 = (dataclasses.replace(v, scale=global_scale) for v in byol_specs(img_size))
    small = dataclasses.replace(global1, size=local_size, scale=local_scale, blur_p=0.5 if local_size >= 64 else 0.0,
                                blur_kernel=_blur_kernel(local_size))
    return [global1, global2] + [small] * n_local


def pil_transform(spec, mean, std):
    """The view `spec` as a torchvision.transforms.v2 pipeline: PIL image (or uint8 (3, H, W)) -> normalized
    float32 (3, size, size), the random draws from torch's global generator (seeded per image by SeededViews)."""
    ops = [v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                                interpolation=v2.InterpolationMode[spec.interpolation.upper()]),
           v2.RandomHorizontalFlip(p=spec.flip_p)]
    if spec.jitter_p:  # v2.ColorJitter draws the four factors and a random order of the four ops per image
        ops.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.gray_p:
        ops.append(v2.RandomGrayscale(p=spec.gray_p))
    if spec.blur_p:
        ops.append(v2.RandomApply([v2.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))  # x -> 1 - x where x >= 0.5 (uint8: 128)
    return v2.Compose([*ops, *_to_normalized(mean, std)])


def pil_views(specs, mean, std):
    """One view per spec, as PIL transforms: img -> [view_1, view_2, ...] (a training script's PIL path)."""
    return MultiView([pil_transform(spec, mean, std) for spec in specs])


def simclr_transform(img_size, mean, std, strength=0.5):
    """SimCLR's view (simclr_spec) as a PIL transform."""
    return pil_transform(simclr_spec(img_size, strength), mean, std)


def byol_transforms(img_size, mean, std):
    """BYOL's (and MoCo v3's) asymmetric pair (byol_specs) as PIL transforms (t1, t2)."""
    return tuple(pil_transform(spec, mean, std) for spec in byol_specs(img_size))


def multicrop_transform(img_size, mean, std, n_global=2, n_local=6, local_size=None,
                        global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), strength=1.0):
    """SwAV's multi-crop (multicrop_specs) as a MultiView of PIL transforms: 2 x 32 px + 6 x 16 px by default."""
    return pil_views(multicrop_specs(img_size, n_global, n_local, local_size, global_scale, local_scale, strength),
                     mean, std)


def finetune_spec(img_size):
    """Supervised fine-tuning's one view: random resized crop (area 20-100%, MoCo v2's crop) and flip, nothing
    else (eval_linear.finetune, the supervised baseline)."""
    return ViewSpec(img_size, scale=(0.2, 1.0))


def finetune_transform(img_size, mean, std):
    """finetune_spec as a PIL transform."""
    return pil_transform(finetune_spec(img_size), mean, std)


def eval_transform(img_size, mean, std):
    """Deterministic: resize the short side to img_size (a no-op on CIFAR at 32), centre crop, normalize."""
    return v2.Compose([v2.Resize(img_size), v2.CenterCrop(img_size), *_to_normalized(mean, std)])


class MultiView:
    """img -> [t(img) for t in transforms]. MultiView([t1, t2]) for BYOL's pair; MultiView(t, n=2) for
    SimCLR's two independent draws of one transform."""

    def __init__(self, transforms, n=1):
        self.transforms = list(transforms) * n if isinstance(transforms, (list, tuple)) else [transforms] * n

    def __call__(self, img):
        return [t(img) for t in self.transforms]

    def __repr__(self):
        return f"MultiView({self.transforms})"


# ---- loaders ----

class SeededViews(Dataset):
    """dataset[i] with its random augmentations drawn from a generator seeded by (seed, epoch, i).

    The views of an image then depend on nothing else: not on the number of loader workers (each of which
    would otherwise draw from its own stream), not on the number of processes, not on the order. So an epoch
    is the same after `--resume`, with other `--workers`, and under torchrun as in one process.
    """

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        # unique for epoch < 1e6 and i < 1e9; seeds apart by 1e15 do not share streams
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i) % 2 ** 63
        with torch.random.fork_rng(devices=[]):  # leave the caller's CPU RNG where it was (workers=0)
            torch.default_generator.manual_seed(sample_seed)  # the CPU generator the transforms draw from
            return self.dataset[i]


class Shard(Sampler):
    """Indices rank, rank + world, ... of a dataset, in order, no padding: the evaluation loaders' share of
    one process under torch.distributed (the features are gathered afterwards)."""

    def __init__(self, n, rank, world):
        self.indices = range(rank, n, world)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def build_loader(dataset, batch_size, workers, train, seed=0):
    """batch_size is per process.

    train: views seeded per image (SeededViews), the order shuffled by a DistributedSampler (with one
    replica in a single process) seeded by `seed`; the loop must call set_epoch(loader, epoch) every
    epoch, or every epoch repeats the first one's order and views. The last partial batch is dropped (a
    loss over a short batch has other negatives and statistics).
    eval (train=False): in order, everything; under torch.distributed each process gets its Shard.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if train:
        dataset = SeededViews(dataset, seed)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
    else:
        sampler = Shard(len(dataset), rank, world) if distributed else None
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                   pin_memory=torch.cuda.is_available(), drop_last=train)


class _Loader(DataLoader):
    """A DataLoader that stops on an unreadable image with one line naming the file, not a worker's traceback."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except UnreadableImage as e:
            raise _unreadable(e) from None


def set_epoch(loader, epoch):
    """Advance a training loader of build_loader or build_device_loader to `epoch`: the sampler's shuffle and
    the per-image augmentation seeds (without it every epoch repeats the first). A no-op on other loaders."""
    if hasattr(loader, "set_epoch"):  # a DeviceLoader (or a wrapper of one)
        loader.set_epoch(epoch)
    elif isinstance(loader.dataset, SeededViews):
        loader.sampler.set_epoch(epoch)
        loader.dataset.epoch = epoch


# ---- the batched path on the device (--aug batched, the default where the training set fits) ----
#
# The training set sits on the device as one uint8 (N, 3, H, W) tensor (CIFAR-10: 150 MB), decoded once, and
# each batch's views are made there by batched ops, every image with its own random draws: the way airbench
# and hlb-CIFAR10 feed a GPU at CIFAR sizes, where per-image PIL work in loader workers cannot keep up. No
# workers. The recipes are the same ViewSpecs as the PIL path's and the ops follow torchvision's, on float32:
#   crop     torchvision's RandomResizedCrop sampling, whole-pixel boxes; the resize is one grid_sample of the
#            whole image (no antialiasing: fine where views are upsampled, as CIFAR's and SwAV's small crops
#            are; an image much larger than its view aliases where PIL would average)
#   jitter   v2.functional's float semantics (brightness multiplies, contrast blends with the mean of the
#            grayscale image, saturation with the grayscale image, hue turns the HSV hue; clamped after each);
#            the PIL path's uint8 kernels round after each op and turn the hue in 1/256 steps
#   blur     the same Gaussian kernel and reflect padding as v2.functional.gaussian_blur
#   solarize x -> 1 - x where x >= 0.5, the PIL path's 255 - x where x >= 128

# An image's uniforms for one view (`uniforms`), column by column: what each one draws.
U_AREA, U_ASPECT, U_TOP, U_LEFT = slice(0, 10), slice(10, 20), 20, 21  # crop: 10 tries (area, aspect), position
U_FLIP = 22
U_JITTER, U_FACTORS, U_ORDER = 23, slice(24, 28), slice(28, 32)  # applied?, 4 factors, sort keys of their order
U_GRAY, U_BLUR, U_SIGMA, U_SOLARIZE = 32, 33, 34, 35
DRAWS = 36


def _mul32(x, c):
    # (x * c) mod 2^32 for x, c < 2^32 in int64 arithmetic, which the full 64-bit product would overflow
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & 0xFFFFFFFF


def _hash32(x):
    # Wellons' "lowbias32" (github.com/skeeto/hash-prospector): a bijection of [0, 2^32) whose outputs for
    # neighbouring inputs look independent. On Python ints and int64 tensors alike.
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed, epoch, indices, view, n=DRAWS):
    """(B, n) float32 uniforms in [0, 1) for the images of dataset indices `indices` (B,), view number `view`
    (< 64): a counter-based generator, a hash of (seed, epoch, image, view, column). As with SeededViews an
    image's views then depend on nothing else (not on its batch, the number of processes, the order, nor on
    CPU or GPU); the hash being a bijection, every draw of an epoch has its own 32 bits (below 2^20 images)."""
    assert view < 64 and n <= 64
    key = _hash32(_hash32(seed % 2 ** 32) ^ epoch % 2 ** 32)
    counter = (indices[:, None].long() * 64 + view) * 64 + torch.arange(n, device=indices.device)  # (B, n)
    bits = _hash32(_hash32((counter & 0xFFFFFFFF) ^ key) ^ (counter >> 32))  # high part: beyond 2^20 images
    return (bits >> 8).float() * 2.0 ** -24  # the top 24 bits, exact in float32


def crop_boxes(u, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params for every image at once, from its uniforms u (B, DRAWS): the
    Inception crop (area uniform in `scale`, log aspect uniform in `ratio`, the first of 10 tries that fits the
    image, else the whole image cut to the nearest allowed aspect), in whole pixels. -> top, left, h, w (B,)."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, U_AREA])            # (B, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, U_ASPECT])                     # (B, 10) w / h
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()         # (B, 10)
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)                           # (B, 10)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first of equal maxima
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]                           # (B,)
    fallback_w, fallback_h = width, height
    if width / height < min(ratio):
        fallback_h = round(width / min(ratio))
    elif width / height > max(ratio):
        fallback_w = round(height * max(ratio))
    found = fits.any(1)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    # a whole-pixel position uniform in [0, height - h] (randint); min(): float32 rounds u * n up to n for u near 1
    top = torch.minimum((u[:, U_TOP] * (height - h + 1)).floor(), height - h)
    left = torch.minimum((u[:, U_LEFT] * (width - w + 1)).floor(), width - w)
    top = torch.where(found, top, (height - h) // 2)  # the fallback is centred
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def resized_crop(x, top, left, h, w, flip, size, mode="bilinear"):
    """Each image's box (B,) of x (B, 3, H, W), mirrored where flip (B,), resized to (B, 3, size, size): one
    affine map per image, sampled by one grid_sample. align_corners=False is resize's pixel-centre convention;
    the border padding repeats the image's edge, as resize does (inside the image a box's outermost output
    pixels blend in a little of the pixels just outside it, where torchvision repeats the box's edge)."""
    B, _, H, W = x.shape
    zero = torch.zeros_like(w)
    theta = torch.stack([  # output (x, y) in [-1, 1] -> input: the box's centre +- its half size
        torch.stack([torch.where(flip, -w / W, w / W), zero, (2 * left + w) / W - 1], 1),
        torch.stack([zero, h / H, (2 * top + h) / H - 1], 1),
    ], 1)                                                                                # (B, 2, 3)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)                # (B, size, size, 2)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def grayscale(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma with v2.functional.rgb_to_grayscale's weights (ITU-R 601-2)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def adjust_hue(x, shift):
    """v2.functional.adjust_hue for every image with its own shift (B,) in turns: RGB -> HSV, hue + shift,
    back to RGB. x (B, 3, H, W) in [0, 1]."""
    r, g, b = x.unbind(1)                                                                # (B, H, W)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)  # V, V (1 - S)
    chroma = maxc - minc                                                                 # V S
    c = torch.where(chroma > 0, chroma, 1.0)  # grey pixels: hue 0, and their chroma 0 below
    hue = torch.where(maxc == r, (g - b) / c, torch.where(maxc == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue = (hue + 6 * shift[:, None, None]) % 6                                           # in sixths of a turn
    # HSV -> RGB: a channel is V within 1 sixth of its own hue (red 0, green 2, blue 4), V - V S beyond 2,
    # linear between; d is the distance around the colour wheel
    d = (hue[:, None] - torch.tensor([0.0, 2.0, 4.0], device=x.device)[:, None, None]).abs()  # (B, 3, H, W)
    d = torch.minimum(d, 6 - d)
    return maxc[:, None] - chroma[:, None] * (d - 1).clamp(0, 1)


def color_jitter(x, factors, order):
    """v2.ColorJitter with every image's own factors (B, 4) (brightness, contrast, saturation, hue), applied in
    its own order (B, 4) (each row a permutation of the op numbers 0 1 2 3). x (B, 3, H, W) in [0, 1].
    Brightness, contrast and saturation are one blend, x f + target (1 - f), with per-image targets (black,
    the grayscale mean, the grayscale image), clamped to [0, 1] after each op as torchvision does. An image's
    sequence is its blends before its hue, the hue, its blends after: one hue turn for the batch, not four."""
    hue_at = (order == 3).to(torch.uint8).argmax(1, keepdim=True)                       # (B, 1)

    def blends(x, at):  # the blend at position k of each image's order where at(k), else nothing (f = 1)
        for k in range(4):
            op = order[:, k:k + 1]                                                       # (B, 1)
            f = torch.where(at(k) & (op != 3), factors.gather(1, op), 1.0)[:, :, None, None]  # (B, 1, 1, 1)
            gray = grayscale(x)                                                          # (B, 1, H, W)
            is_contrast, is_saturation = (op == 1)[:, :, None, None], (op == 2)[:, :, None, None]
            target = gray.mean((1, 2, 3), keepdim=True) * is_contrast + gray * is_saturation  # black: brightness
            x = (x * f + target * (1 - f)).clamp_(0, 1)
        return x

    x = blends(x, lambda k: k < hue_at)
    x = adjust_hue(x, factors[:, 3])
    return blends(x, lambda k: k > hue_at)


def gaussian_blur(x, kernel_size, sigma):
    """v2.functional.gaussian_blur for every image with its own sigma (B,): per image a separable Gaussian
    kernel, applied along W then H as one grouped convolution over all B * 3 channels (reflect padding)."""
    B, C, H, W = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    kernel = torch.softmax(-(t / sigma[:, None]) ** 2 / 2, dim=1).repeat_interleave(C, 0)  # (B * C, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)                             # along W
    y = F.conv2d(y, kernel[:, None, :, None], groups=B * C)                             # along H
    return y.view(B, C, H, W)


def device_view(x, spec, u):
    """The view `spec` of every image of a batch, each with its own draws: x float (B, 3, H, W) in [0, 1], u
    (B, DRAWS) the view's uniforms (`uniforms`) -> (B, 3, size, size) in [0, 1], not normalized. pil_transform's
    ops in its order, each one batched call: the probabilities pick images, not batches."""
    B, _, H, W = x.shape

    def on(column, p):  # (B, 1, 1, 1): 1.0 where the op applies to the image, else 0.0
        return (u[:, column] < p).float()[:, None, None, None]

    def pick(mask, y, x):  # y where mask (B, 1, 1, 1) is 1, else x: lerp by a 0/1 weight is exact, and on CPU
        return torch.lerp(x, y, mask)  # much faster than torch.where with a broadcast condition

    def between(lo_hi, column):  # uniform in [lo, hi]
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u[:, column]

    top, left, h, w = crop_boxes(u, H, W, spec.scale, spec.ratio)
    x = resized_crop(x, top, left, h, w, u[:, U_FLIP] < spec.flip_p, spec.size, spec.interpolation)
    if spec.interpolation == "bicubic":
        x = x.clamp(0, 1)  # bicubic overshoots at edges; resize on uint8 and PIL clamp too
    if spec.jitter_p:
        s = spec.jitter  # v2.ColorJitter's ranges: factors in [max(0, 1 - s), 1 + s], hue in [-s, s]
        lo = torch.tensor([max(0.0, 1 - v) for v in s[:3]] + [-s[3]], device=x.device)
        hi = torch.tensor([1 + v for v in s[:3]] + [s[3]], device=x.device)
        factors = between((lo, hi), U_FACTORS)                                           # (B, 4)
        order = u[:, U_ORDER].argsort(1)  # (B, 4): sorting 4 uniforms gives a uniform random permutation
        x = pick(on(U_JITTER, spec.jitter_p), color_jitter(x, factors, order), x)
    if spec.gray_p:
        x = pick(on(U_GRAY, spec.gray_p), grayscale(x).expand_as(x), x)
    if spec.blur_p:
        x = pick(on(U_BLUR, spec.blur_p), gaussian_blur(x, spec.blur_kernel, between(spec.blur_sigma, U_SIGMA)), x)
    if spec.solarize_p:
        x = pick(on(U_SOLARIZE, spec.solarize_p), torch.where(x >= 0.5, 1 - x, x), x)
    return x


def device_views(images, indices, specs, mean, std, seed=0, epoch=0):
    """One normalized float32 (B, 3, size, size) per spec, of images (B, 3, H, W) (uint8, or float in [0, 1])
    whose dataset indices are `indices` (B,) (their random draws): what a DeviceLoader yields as views."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return [(device_view(x, spec, uniforms(seed, epoch, indices, v)) - mean) / std for v, spec in enumerate(specs)]


class DeviceLoader:
    """build_device_loader's training loader: for batch after batch of the sampler's indices, (views, labels)
    as build_loader's DataLoader yields them, made on the images' device. len() and set_epoch() as a loader's."""

    def __init__(self, images, labels, specs, mean, std, batch_size, seed=0, rank=0, world=1):
        self.images, self.labels = images, labels  # (N, 3, H, W) uint8 and (N,), on the device
        self.specs, self.mean, self.std = specs, mean, std
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        # the very sampler of build_loader: the same shuffle for the same seed and epoch, the same shards
        self.sampler = DistributedSampler(range(len(images)), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)

    def __len__(self):
        return len(self.sampler) // self.batch_size  # drop_last

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self):
        order = torch.tensor(list(self.sampler), device=self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]                   # (B,)
            yield device_views(self.images[idx], idx, self.specs, self.mean, self.std, self.seed,
                               self.epoch), self.labels[idx]


class MixedSizes(DataError):
    """A training set whose images are not all one size: the batched path keeps them as one tensor."""


def _base(dataset):
    """(the dataset under any torch.utils.data.Subset wrappers, the indices into it, or None for all)."""
    indices = None
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in (range(len(dataset)) if indices is None else indices)]
        dataset = dataset.dataset
    return dataset, indices


def image_shape(dataset):
    """(3, H, W) of a dataset's images as decode_all keeps them, without decoding: torchvision's arrays are in
    memory already; an ImageFolder's first image's header. None where that image cannot be read."""
    base, indices = _base(dataset)
    if isinstance(base, torchvision.datasets.CIFAR10):  # (N, H, W, 3)
        return (3, *base.data.shape[1:3])
    if isinstance(base, torchvision.datasets.STL10):  # (N, 3, H, W)
        return tuple(base.data.shape[1:])
    try:
        with Image.open(base.samples[0 if indices is None else indices[0]][0]) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError):
        return None  # an unreadable first image: decoding names it
    return (3, h, w)


def decoded_bytes(dataset):
    """The size of a training set as one uint8 (N, 3, H, W) tensor, without decoding it (image_shape)."""
    shape = image_shape(dataset)
    return 0 if shape is None else math.prod(shape) * len(dataset)


def _files_key(samples, classes):
    """What a decode cache was made from: every file's path, size and modification time, and the classes."""
    h = hashlib.sha1(repr(classes).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_files(samples, loader, threads, show):
    """uint8 (N, 3, H, W) of the files, read by `loader` (PIL, converted to RGB) on `threads` threads (they help
    only where PIL lets go of the GIL for long: not for CIFAR's 32 px JPEGs), with a progress bar; MixedSizes if
    they are not all one size."""
    def read(path):
        try:
            return v2.functional.pil_to_tensor(loader(path))                              # (3, H, W) uint8
        except UnreadableImage as e:
            raise _unreadable(e) from None
    first = read(samples[0][0])
    images = torch.empty((len(samples), *first.shape), dtype=torch.uint8)
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(samples), desc="decoding", unit="img",
                                                           disable=not show, leave=False) as bar:
        for i, (x, (path, _)) in enumerate(zip(pool.map(read, [p for p, _ in samples], chunksize=256), samples)):
            if x.shape != first.shape:
                (h, w), (h0, w0) = x.shape[1:], first.shape[1:]
                raise MixedSizes(f"the batched path keeps the training set as one tensor of equal-sized images, "
                                 f"but {path} is {w}x{h} and {samples[0][0]} {w0}x{h0}")
            images[i] = x
            bar.update()
    return images


def decode_all(dataset, workers=1, cache=True, show=False):
    """A training set of build_dataset (or a Subset of one), without its transform: uint8 (N, 3, H, W) and labels
    (N,), on the CPU, and a line saying where they came from. torchvision's arrays are in memory already; an
    ImageFolder's files are decoded once (on `workers` threads), and kept (cache=True; not for a Subset) in
    `.decoded-<split>.pt` beside its split folder: a later run loads that instead, unless a file was added,
    removed or changed since (its path, size or modification time). A cache that cannot be written is skipped
    with a note."""
    base, indices = _base(dataset)
    pick = (lambda t: t) if indices is None else (lambda t: t[torch.as_tensor(indices)])
    if isinstance(base, torchvision.datasets.CIFAR10):  # and CIFAR-100: (N, 32, 32, 3) uint8 in memory
        images = torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous()
        return pick(images), pick(torch.tensor(base.targets)), "torchvision's arrays, nothing to decode"
    if isinstance(base, torchvision.datasets.STL10):  # (N, 3, 96, 96) uint8 in memory; unlabeled: -1
        return pick(torch.from_numpy(base.data)), pick(torch.from_numpy(base.labels).long()), \
            "torchvision's arrays, nothing to decode"
    samples = base.samples if indices is None else [base.samples[i] for i in indices]
    labels = torch.tensor([label for _, label in samples])
    cache = cache and indices is None  # a part of a folder does not replace the whole one's cache
    t0 = time.perf_counter()
    path = os.path.join(os.path.dirname(os.path.normpath(base.root)), f".decoded-{os.path.basename(base.root)}.pt")
    key = _files_key(samples, base.classes) if cache else None
    if cache and os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                return saved["images"], labels, f"{len(samples):,} images loaded from {path} " \
                                                f"in {time.perf_counter() - t0:.1f} s"
        except Exception:  # a truncated or foreign file: decode again and replace it
            pass
    threads = max(1, workers)
    images = _decode_files(samples, base.loader, threads, show)
    seconds = time.perf_counter() - t0
    how = f"{len(samples):,} images decoded in {seconds:.1f} s on {threads} thread{'s' * (threads > 1)}"
    if cache:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            torch.save({"key": key, "images": images}, tmp)
            os.replace(tmp, path)  # whole or not at all, also when two processes write it
            how += f", cached in {path}"
        except OSError as e:  # a read-only or full disk: train without the cache
            how += f" (not cached: {e})"
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return images, labels, how


# The default --aug auto: the batched path when the decoded training set fits this budget (and, on a GPU, half of
# its free memory): CIFAR-10/100's 50,000 images are 150 MB, Tiny ImageNet's 100,000 1.2 GB; STL-10's 105,000
# pretraining images at 96 px (2.9 GB) and ImageNet take PIL loader workers.
BATCHED_BUDGET = 2 * 1024 ** 3


def choose_aug(aug, dataset, device):
    """("batched" | "pil", why): what --aug auto | batched | pil means for this training set and device."""
    if aug != "auto":
        return aug, f"--aug {aug}"
    size, device = decoded_bytes(dataset), torch.device(device)
    budget, where = BATCHED_BUDGET, f"the {BATCHED_BUDGET / 1024 ** 3:.0f} GB budget"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if free / 2 < budget:
            budget, where = free / 2, f"half of the {free / 1e9:.1f} GB free on {device}"
    if size > budget:
        return "pil", f"the training set is {size / 1e9:.1f} GB as uint8, more than {where}"
    return "batched", f"the training set is {size / 1e6:,.0f} MB as uint8, within {where}"


def build_train_loader(dataset, specs, mean, std, batch_size, workers, device, seed=0, aug="auto",
                       announce=False):
    """Every training script's loader. dataset: a training set of build_dataset without a transform (or a
    Subset of one); specs: one ViewSpec per view; batch_size is per process. aug: "batched" (views made a
    batch at a time on `device` from the decoded set: build_device_loader), "pil" (PIL views in `workers`
    loader processes: build_loader) or "auto" (batched where the decoded set fits BATCHED_BUDGET, and all its
    images have one size; else PIL). Both yield (views, labels) for the same seed from the same recipe, each
    image's views fixed by (seed, epoch, image). announce: print which path and why (the main process)."""
    path, why = choose_aug(aug, dataset, device)
    if path == "batched":
        try:
            # decoded on one thread: at CIFAR's size more do not help (50,000 JPEGs on the README's 2-core CPU:
            # 21.1 s on 1 thread, 23.7 s on 2, 27.2 s on 4; PIL holds the GIL for most of a 32 px image)
            loader = build_device_loader(dataset, specs, mean, std, batch_size, device, seed, 1, announce)
            why += f"; {loader.decoded}"
        except MixedSizes as e:
            if aug == "batched":
                raise DataError(f"--aug batched: {e}: use --aug pil (or resize the images to one size)") from None
            path, why = "pil", str(e).replace("the batched path keeps", "batched would keep")
    if announce:
        print(f"augmentation: {path} ({why})")
    if path == "batched":
        return loader
    base, _ = _base(dataset)
    base.transform = pil_views(specs, mean, std)
    return build_loader(dataset, batch_size, workers, train=True, seed=seed)


class DecodedEval:
    """build_eval_loader's loader over the decoded set: batches of (normalized float32 (B, 3, H, W), labels (B,)),
    in order, this process's Shard under torch.distributed. The pixels go through eval_transform's own tensor
    ops (ToDtype with scale, then Normalize), so a batch equals the PIL path's bit for bit."""

    def __init__(self, images, labels, mean, std, batch_size, rank=0, world=1):
        self.images, self.labels, self.mean, self.std = images, labels, list(mean), list(std)
        self.batch_size, self.indices = batch_size, torch.arange(rank, len(images), world)

    def __len__(self):
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            idx = self.indices[i:i + self.batch_size]
            x = v2.functional.to_dtype(self.images[idx], torch.float32, scale=True)          # (B, 3, H, W)
            yield v2.functional.normalize(x, self.mean, self.std), self.labels[idx]


class Transformed(Dataset):
    """dataset[i] = (transform(image), label) for a dataset of (image, label) and a transform."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.transform(img), label


def build_eval_loader(dataset, img_size, mean, std, batch_size, workers):
    """The evaluation loader (k-NN, linear probe, the features of every script): in order, everything, this
    process's Shard under torch.distributed; batches of (eval_transform(img_size, mean, std) of the images,
    labels). dataset: build_dataset's without a transform, or a Subset of one.

    Where the images are img_size squares already (eval_transform's Resize and CenterCrop are then no-ops) and
    the set fits BATCHED_BUDGET, the batches come from the set decoded once (decode_all, cached beside a folder:
    DecodedEval), equal to PIL's bit for bit; else from build_loader's PIL workers. On the README's 2-core CPU
    one PIL worker spends 9.2 s of CPU on CIFAR-10's 10,000 test JPEGs, the decoded set 0.1 s (its cache loads
    in about a second): a CPU that the forward pass now has to itself (a study's CIFAR-10 evaluation of
    vit_mini/8, 60,000 images and four probes: 118 s before, 51 s after, in the same study's log)."""
    if image_shape(dataset) == (3, img_size, img_size) and decoded_bytes(dataset) <= BATCHED_BUDGET:
        try:
            images, labels, _ = decode_all(dataset, workers)
        except MixedSizes:
            pass
        else:
            distributed = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
            return DecodedEval(images, labels, mean, std, batch_size, rank, world)
    return build_loader(Transformed(dataset, eval_transform(img_size, mean, std)), batch_size, workers, train=False)


def build_device_loader(dataset, specs, mean, std, batch_size, device, seed=0, workers=1, show=False):
    """The batched training loader. dataset: a training set of build_dataset (or a Subset of one; its transform
    is not used), decoded once by decode_all (on `workers` threads; show: a progress bar) into one uint8
    (N, 3, H, W) tensor moved to `device`, labels alongside; specs: one ViewSpec per view ([simclr_spec(...)] * 2,
    byol_specs(...), multicrop_specs(...)); batch_size is per process.

    It yields what build_loader(train=True) yields for the same seed: (views, labels), the views a list of
    normalized float32 (B, 3, size, size) (here already on the device), batches of the same DistributedSampler
    (same shuffle per seed and epoch, sharded under torch.distributed, drop_last); set_epoch(loader, epoch)
    every epoch. An image's views depend on (seed, epoch, image) only, as the PIL path's. `.decoded` says where
    the images came from and how long that took."""
    images, labels, how = decode_all(dataset, workers, show=show)
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if images.nbytes > free / 2:
            raise DataError(f"--aug batched: the training set is {images.nbytes / 1e9:.1f} GB as uint8, more than "
                            f"half of the {free / 1e9:.1f} GB free on {device}: use --aug pil")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    loader = DeviceLoader(images.to(device), labels.to(device), specs, mean, std, batch_size, seed, rank, world)
    loader.decoded = how
    return loader


# ---- python data.py --show ----

def method_specs(method, img_size):
    """The ViewSpecs each training script uses, by method name, one per view (at the papers' defaults)."""
    if method == "simclr":
        return [simclr_spec(img_size)] * 2
    if method in ("byol", "moco"):
        return list(byol_specs(img_size))
    if method == "swav":
        return multicrop_specs(img_size, strength=0.5)  # swav.py's default --color-strength
    if method == "dino":
        return dino_specs(img_size)
    raise ValueError(f"unknown method {method!r}")


def method_views(method, img_size, mean, std):
    """The MultiView each training script uses, by method name."""
    return pil_views(method_specs(method, img_size), mean, std)


def show_labels(specs, img_size):
    """The header of show's columns: the original, then one label per view spec, each with its side in pixels.
    Views all of img_size are "view 1", "view 2", ...; multi-crop's (some smaller) "global i" and "small i"."""
    multicrop = any(spec.size != img_size for spec in specs)
    labels, count = [f"original\n{img_size} px"], {}
    for spec in specs:
        kind = ("global" if spec.size == img_size else "small") if multicrop else "view"
        count[kind] = count.get(kind, 0) + 1
        labels.append(f"{kind} {count[kind]}\n{spec.size} px")
    return labels


SHOW_HEADER = 32  # px of white above show's grid: every column's label, two lines


def _with_header(grid, labels, left, pitch):
    """grid float (3, H, W) in [0, 1] -> a PIL image with SHOW_HEADER px of white on top, labels[c] centred over
    column c (its centre at x = left + c * pitch). PIL's own default font: no matplotlib."""
    from PIL import ImageDraw, ImageFont
    body = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # as save_image rounds
    image = Image.new("RGB", (body.shape[1], body.shape[0] + SHOW_HEADER), "white")
    image.paste(Image.fromarray(body), (0, SHOW_HEADER))
    try:
        font = ImageFont.load_default(size=12)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        font = ImageFont.load_default()         # older Pillow: the fixed bitmap font
    draw = ImageDraw.Draw(image)
    for c, text in enumerate(labels):
        x0, y0, x1, y1 = draw.multiline_textbbox((0, 0), text, font=font, align="center")
        draw.multiline_text((left + c * pitch - (x0 + x1) / 2, (SHOW_HEADER - (y1 - y0)) / 2 - y0), text,
                            fill="black", font=font, align="center")
    return image


def show(method, out, dataset="folder", data_dir=SAMPLE_DIR, img_size=32, rows=6, seed=0, aug="auto"):
    """PNG grid: one image per row, its original (eval transform) then the method's views, un-normalized, under a
    header naming each column and its side in pixels (show_labels: "original", "view 1", "view 2"; multi-crop:
    "global 1", ..., "small 1", ...). Views smaller than the cell (multi-crop's small crops) sit at their own
    size on grey: the crops keep their true relative sizes. aug: which path's views, as the training scripts'
    --aug (auto: the one they would take for this dataset; batched: device_views, here on the CPU; pil).
    torchvision's datasets are downloaded into data_dir when missing, as the training scripts do."""
    if Path(out).suffix.lower() not in Image.registered_extensions():
        raise DataError(f"--out {out}: give the name of an image file to write, like views.png")
    torch.manual_seed(seed)
    mean, std = MEAN_STD[dataset]
    ds = build_dataset(dataset, data_dir, "train", download=True)
    views, orig = method_views(method, img_size, mean, std), eval_transform(img_size, mean, std)
    if rows > len(ds):
        raise DataError(f"--rows {rows}: {data_dir} has {len(ds)} training images")
    picks = range(0, len(ds), len(ds) // rows)[:rows]  # evenly spaced: different classes in a sorted tree
    batched = choose_aug(aug, ds, "cpu")[0] == "batched"
    if batched:
        images = torch.stack([v2.functional.pil_to_tensor(ds[i][0]) for i in picks])   # (rows, 3, H, W) uint8
        batch = device_views(images, torch.tensor(picks), method_specs(method, img_size), mean, std, seed)
    cells = []
    for row, i in enumerate(picks):
        img, _ = ds[i]
        for x in [orig(img)] + ([v[row] for v in batch] if batched else views(img)):
            x = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
            cell = torch.full((3, img_size, img_size), 0.5)
            top, left = (img_size - x.shape[1]) // 2, (img_size - x.shape[2]) // 2
            cell[:, top:top + x.shape[1], left:left + x.shape[2]] = x
            cells.append(cell)
    pad = 2
    grid = torchvision.utils.make_grid(cells, nrow=1 + len(views.transforms), padding=pad, pad_value=1.0)
    zoom = max(1, 128 // img_size)  # 32 px images are too small to judge at 1:1
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=zoom, mode="nearest")[0]
    labels = show_labels(method_specs(method, img_size), img_size)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    _with_header(grid, labels, zoom * (pad + img_size / 2), zoom * (img_size + pad)).save(out, optimize=True)
    print(f"wrote {out}: {rows} images x (original + {len(views.transforms)} {method} views"
          f"{', batched path' if batched else ', PIL path'})")


def get_args_parser():
    p = script_parser(__doc__, __file__)
    p.add_argument("--show", required=True, choices=["simclr", "byol", "moco", "swav", "dino"],
                   help="the method whose views to draw")
    p.add_argument("--out", default="views.png", help="the PNG to write")
    p.add_argument("--dataset", default="folder", choices=list(MEAN_STD), help="as the training scripts' --dataset")
    p.add_argument("--data-dir", default=str(SAMPLE_DIR),
                   help="as the training scripts' --data-dir (default: the shipped CIFAR-10 sample, tests/data_sample)")
    p.add_argument("--img-size", type=pixel_side, default=32, help="the views' side in pixels")
    p.add_argument("--rows", type=positive_int, default=6, help="images, one per row, evenly spaced in the train split")
    p.add_argument("--seed", type=seed_int, default=0, help="the views' random draws")
    p.add_argument("--aug", default="auto", choices=["auto", "batched", "pil"],
                   help="whose views: the training scripts' --aug (auto: the path they take for this dataset)")
    return p


def main(argv=None):
    a = get_args_parser().parse_args(argv)
    show(a.show, a.out, a.dataset, a.data_dir, a.img_size, a.rows, a.seed, a.aug)


if __name__ == "__main__":
    main()

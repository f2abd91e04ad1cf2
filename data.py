"""Datasets, per-method augmentations (SimCLR, BYOL/MoCo v3, SwAV multi-crop) and loaders.

- `build_dataset(name, data_dir, split, transform)`: cifar10, cifar100, stl10 (torchvision) or `folder`
  (an ImageFolder tree `<dir>/train/<class>/*.jpg` + `<dir>/test/` or `val/`), yielding (transform(img), label).
  Every dataset has `.classes` (names in label order); `num_classes(ds)` is `len(ds.classes)`.
- One transform builder per paper, literal values in the paper's order, each naming its table or section.
  A transform maps a PIL image to a normalized float tensor (3, H, W); `MultiView` turns transforms into
  the list of views a method trains on, which the default collate stacks into a list of (B, 3, H, W).
- `build_loader(dataset, batch_size, workers, train, seed)`: per-image augmentation seeds, the shuffle
  (a DistributedSampler, one replica in one process), drop_last; `set_epoch(loader, epoch)` every epoch.

Images are augmented as PIL images: at CIFAR's 32 px the PIL kernels beat the same torchvision.transforms.v2
ops on uint8 tensors (which spend their time in per-op overhead, hue above all) by about 1.2x on one core;
`python benchmarks/augment_speed.py` measures it. v2 dispatches on the input type, so feeding these same
transforms a uint8 tensor (torchvision.io.decode_image) runs the tensor kernels instead.

Look at what a method trains on (rows: images; columns: the original, then the views):
    python data.py --show simclr --out views.png
    python data.py --show swav --out views.png --dataset folder --data-dir ../shared/datasets/cifar10
"""
import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

SAMPLE_DIR = Path(__file__).resolve().parent / "tests" / "data_sample"  # shipped CIFAR-10 sample, 1000/500


class DataError(SystemExit):
    """Missing or malformed data. A SystemExit, so a script that does not catch it prints this one line
    and exits with status 1 instead of showing a traceback: the fix is in the message, not in the code."""


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
    try:
        return tv[name](data_dir, **where, transform=transform, download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"{name} not found in {data_dir}: pass --download to fetch it there (needs internet), "
                        f"or use --dataset folder --data-dir <ImageFolder tree>") from None
    except OSError as e:  # no network, refused connection, full disk, ...
        raise DataError(f"downloading {name} to {data_dir} failed ({e}); without internet use "
                        f"--dataset folder --data-dir <ImageFolder tree>") from None


def _image_folder(data_dir, split, transform):
    expected = f"expected {data_dir}/train/<class>/*.jpg and {data_dir}/test/<class>/*.jpg (or val/)"
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} does not exist: {expected}")
    sub = [os.path.join(data_dir, s) for s in ((split,) if split == "train" else ("test", "val"))]
    sub = [s for s in sub if os.path.isdir(s)]
    if not sub:
        raise DataError(f"no {split} folder in {data_dir}: {expected}")
    try:  # the default loader opens with PIL and converts to RGB (grayscale and RGBA files included)
        ds = torchvision.datasets.ImageFolder(sub[0], transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise DataError(f"{e} ({expected})") from None
    if split != "train" and os.path.isdir(os.path.join(data_dir, "train")):
        # labels are class-folder indices: another set of folders in test/ would silently shift them
        train_classes = ds.find_classes(os.path.join(data_dir, "train"))[0]  # ImageFolder's own rule
        if ds.classes != train_classes:
            raise DataError(f"{sub[0]} has classes {ds.classes}, but {data_dir}/train has {train_classes}: "
                            f"both need the same class folders")
    return ds


def num_classes(dataset):
    return len(dataset.classes)


# ---- augmentations ----

def _to_normalized(mean, std):
    # PIL or uint8 (3, H, W) -> float32 in [0, 1] -> (x - mean) / std
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _blur_kernel(size):
    # SimCLR App. A: kernel 10% of the image side; BYOL's 23 px at 224. Odd for a centred kernel: 32 -> 3.
    return int(0.1 * size) // 2 * 2 + 1


def _color_distortion(s):
    # SimCLR App. A, "color_distort": jitter (brightness, contrast, saturation, hue) = (0.8s, 0.8s, 0.8s, 0.2s)
    # in random order (as v2.ColorJitter does) with p 0.8, then color drop (grayscale) with p 0.2
    return [v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8), v2.RandomGrayscale(p=0.2)]


def simclr_transform(img_size, mean, std, strength=0.5):
    """SimCLR (Chen et al. 2020, arXiv:2002.05709) App. A. strength s: 1.0 on ImageNet, 0.5 on CIFAR-10
    (App. B.9). Gaussian blur (p 0.5, sigma 0.1-2) is ImageNet-only: App. B.9 drops it on 32 px CIFAR; we
    keep it for images of 64 px and more (STL-10's 96 px)."""
    blur = [v2.RandomApply([v2.GaussianBlur(_blur_kernel(img_size), sigma=(0.1, 2.0))], p=0.5)]
    return v2.Compose([
        # area 8-100%, aspect ratio 3/4-4/3, resized bicubic (the reference code's crop_and_resize)
        v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(p=0.5),
        *_color_distortion(strength),
        *(blur if img_size >= 64 else []),
        *_to_normalized(mean, std),
    ])


def byol_transforms(img_size, mean, std):
    """BYOL (Grill et al. 2020, arXiv:2006.07733) App. B, Table 6: the asymmetric pair (t1, t2), which differ
    only in blur (p 1.0 / 0.1) and solarization (p 0.0 / 0.2). MoCo v3 (arXiv:2104.02057) uses the same
    pair. The blur kernel is 10% of the side, made odd: 23 px at 224 as in BYOL. Below 64 px there is no
    blur, as in SimCLR's CIFAR recipe (App. B.9) and the CIFAR configs of solo-learn (asymmetric.yaml) and
    lightly's benchmark: a 3 px kernel with sigma up to 2 wipes out most of a 32 px image."""
    def view(blur_p, solarize_p):
        blur_p = blur_p if img_size >= 64 else 0.0
        return v2.Compose([
            # Table 6: bicubic resize
            v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(_blur_kernel(img_size), sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),  # x -> 1 - x where x >= 0.5 (uint8 / PIL: 128)
            *_to_normalized(mean, std),
        ])
    return view(1.0, 0.0), view(0.1, 0.2)


def multicrop_transform(img_size, mean, std, n_global=2, n_local=6, local_size=None,
                        global_scale=(0.14, 1.0), local_scale=(0.05, 0.14)):
    """SwAV (Caron et al. 2020, arXiv:2006.09882) Sec. 3.2 multi-crop: n_global crops at img_size (area
    global_scale) then n_local small crops at local_size (area local_scale); the paper's 2x224 + 6x96 is
    multicrop_transform(224, ..., local_size=96). local_size defaults to img_size // 2 (32 -> 16 px; patch 4
    divides both). Each crop: flip, SimCLR's color distortion at s = 1.0 and, from 64 px up, blur p 0.5
    (SwAV's main_swav.py)."""
    local_size = local_size or img_size // 2

    def crop(size, scale):
        blur = [v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=0.5)]
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=scale),  # bilinear, torchvision's default, as in main_swav.py
            v2.RandomHorizontalFlip(p=0.5),
            *_color_distortion(1.0),
            *(blur if size >= 64 else []),
            *_to_normalized(mean, std),
        ])
    return MultiView([crop(img_size, global_scale)] * n_global + [crop(local_size, local_scale)] * n_local)


def finetune_transform(img_size, mean, std):
    """Supervised fine-tuning: random resized crop (area 20-100%, MoCo v2's crop) and flip, nothing else."""
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(p=0.5),
                       *_to_normalized(mean, std)])


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
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=train)


def set_epoch(loader, epoch):
    """Advance a training loader of build_loader to `epoch`: the sampler's shuffle and the per-image
    augmentation seeds (without it every epoch repeats the first). A no-op on other loaders."""
    if isinstance(loader.dataset, SeededViews):
        loader.sampler.set_epoch(epoch)
        loader.dataset.epoch = epoch


# ---- python data.py --show ----

def method_views(method, img_size, mean, std):
    """The MultiView each training script uses, by method name."""
    if method == "simclr":
        return MultiView(simclr_transform(img_size, mean, std), n=2)
    if method in ("byol", "moco"):
        return MultiView(byol_transforms(img_size, mean, std))
    if method == "swav":
        return multicrop_transform(img_size, mean, std)
    raise ValueError(f"unknown method {method!r}")


def show(method, out, dataset="folder", data_dir=SAMPLE_DIR, img_size=32, rows=6, seed=0):
    """PNG grid: one image per row, its original (eval transform) then the method's views, un-normalized;
    views smaller than the cell (multi-crop) sit at their own size on grey."""
    torch.manual_seed(seed)
    mean, std = MEAN_STD[dataset]
    ds = build_dataset(dataset, data_dir, "train")
    views, orig = method_views(method, img_size, mean, std), eval_transform(img_size, mean, std)
    cells = []
    for i in range(0, len(ds), len(ds) // rows)[:rows]:  # evenly spaced: different classes in a sorted tree
        img, _ = ds[i]
        for x in [orig(img)] + views(img):
            x = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
            cell = torch.full((3, img_size, img_size), 0.5)
            top, left = (img_size - x.shape[1]) // 2, (img_size - x.shape[2]) // 2
            cell[:, top:top + x.shape[1], left:left + x.shape[2]] = x
            cells.append(cell)
    grid = torchvision.utils.make_grid(cells, nrow=1 + len(views.transforms), padding=2, pad_value=1.0)
    zoom = max(1, 128 // img_size)  # 32 px images are too small to judge at 1:1
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=zoom, mode="nearest")[0]
    torchvision.utils.save_image(grid, out)
    print(f"wrote {out}: {rows} images x (original + {len(views.transforms)} {method} views)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--show", required=True, choices=["simclr", "byol", "moco", "swav"])
    p.add_argument("--out", default="views.png")
    p.add_argument("--dataset", default="folder", choices=list(MEAN_STD))
    p.add_argument("--data-dir", default=str(SAMPLE_DIR), help="default: the shipped CIFAR-10 sample")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    show(a.show, a.out, a.dataset, a.data_dir, a.img_size, a.rows, a.seed)

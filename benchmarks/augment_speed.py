"""SimCLR two-view augmentation throughput: the PIL path against uint8 tensors and the batched device path.

On CIFAR it is the augmentation that starves a GPU. The paths, all making the two views of
`data.simclr_spec` (SimCLR's CIFAR-10 recipe) from the same images:
  pil         data.build_dataset's images as the training scripts get them, PIL kernels, one image at a time:
              a folder's files read and decoded inside the timed loop (PIL.Image.open + convert RGB) as a
              DataLoader worker does; torchvision's CIFAR turns its in-memory array into a PIL image  <- data.py's
  tensor      the same transform on uint8 (3, H, W) tensors: v2's tensor kernels. A folder's files decoded by
              torchvision.io.decode_image (deprecated in torchvision 0.29 in favour of TorchCodec; it still
              works), torchvision's in-memory arrays taken as tensors
  pil xN      the pil path in a DataLoader of N worker processes, all cores
  device      --aug batched: the images decoded once (not timed) into one uint8 (N, 3, H, W) tensor, views made in
              batches by data.DeviceLoader, on the CPU with 1 thread and with all threads, and on CUDA when
              there is a GPU (there over the images repeated to --gpu-images, CIFAR-10's 50,000)
Every repeat times every path, one after the other; a path's figure is the median over repeats of its rate and
of its ratio to the pil path's rate in the same repeat (the machines are shared and noisy: compare within one
run only).

    python benchmarks/augment_speed.py                 # CIFAR-10 (downloaded into ./data), 2000 train images
    python benchmarks/augment_speed.py --dataset folder --data-dir tests/data_sample --images 1000
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


def decode_rgb(path):
    return decode_image(path, mode=ImageReadMode.RGB)  # uint8 (3, H, W)


class TensorImages(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) and labels (N,) as a dataset of (transform(image), label)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def tensor_dataset(dataset, transform):
    """The images of `dataset` (one of data.build_dataset) as uint8 (3, H, W) tensors, into `transform`: a
    folder's files decoded by decode_image at every access, torchvision's in-memory arrays (nothing to decode)."""
    if isinstance(dataset, torchvision.datasets.ImageFolder):
        return torchvision.datasets.ImageFolder(dataset.root, transform=transform, loader=decode_rgb)
    return TensorImages(*data.decode_all(dataset)[:2], transform)


def uint8_images(dataset, indices):
    """The images at indices as one uint8 (n, 3, H, W) tensor (a folder's files read and decoded as the pil path
    reads them), and their labels (n,): what the device path keeps."""
    if isinstance(dataset, torchvision.datasets.ImageFolder):
        images = [v2.functional.pil_to_tensor(dataset.loader(dataset.samples[i][0])) for i in indices]
        return torch.stack(images), torch.tensor([dataset.targets[i] for i in indices])
    images, labels, _ = data.decode_all(dataset)
    return images[indices], labels[indices]


def images_per_second(dataset, indices):
    t0 = time.perf_counter()
    for i in indices:
        views, _ = dataset[i]  # read + decode + two augmented views
    return len(indices) / (time.perf_counter() - t0)


def loader_images_per_second(loader, sync=lambda: None):
    """One pass over a loader that yields (views, labels); images (not views) per second."""
    sync()
    t0, n = time.perf_counter(), 0
    for views, labels in loader:
        n += labels.shape[0]
    sync()
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder"],
                   help="torchvision's (downloaded into --data-dir when missing) or an ImageFolder tree (folder); "
                   "default: %(default)s")
    p.add_argument("--data-dir", default="data", help="where the dataset is, or goes (default: %(default)s)")
    p.add_argument("--images", type=int, default=2000, help="evenly spaced over the train split (all classes)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=512, help="the device path's batch (simclr.py's default)")
    p.add_argument("--gpu-images", type=int, default=50000, help="the device path on CUDA: images per pass")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)  # one core, as one DataLoader worker has

    mean, std = data.MEAN_STD[args.dataset]
    specs = [data.simclr_spec(args.img_size)] * 2
    views = data.MultiView([data.pil_transform(spec, mean, std) for spec in specs])
    pil = data.build_dataset(args.dataset, args.data_dir, "train", transform=views, download=True)
    tensor = tensor_dataset(pil, views)
    step = max(1, len(pil) // args.images)
    indices = list(range(0, len(pil), step))[:args.images]
    workers = DataLoader(Subset(pil, indices), batch_size=256, num_workers=cores, persistent_workers=True)

    t0 = time.perf_counter()  # the device path reads every image once, then keeps them as one uint8 tensor
    images, labels = uint8_images(pil, indices)
    decode_s = time.perf_counter() - t0
    device = {"device 1 thread": data.DeviceLoader(images, labels, specs, mean, std, args.batch_size),
              f"device {cores} threads": data.DeviceLoader(images, labels, specs, mean, std, args.batch_size)}
    threads = {"device 1 thread": 1, f"device {cores} threads": cores}
    if torch.cuda.is_available():
        repeat = -(-args.gpu_images // len(images))  # the images again and again: CIFAR-10's size, on the GPU
        device["device cuda"] = data.DeviceLoader(images.repeat(repeat, 1, 1, 1)[:args.gpu_images].cuda(),
                                                  labels.repeat(repeat)[:args.gpu_images].cuda(), specs, mean, std,
                                                  args.batch_size)

    batch_views = next(iter(device["device 1 thread"]))[0]
    out = [v.shape for v in pil[0][0]], [v.shape for v in tensor[0][0]], [v.shape[1:] for v in batch_views]
    assert out[0] == out[1] == out[2], out

    def measure():
        rates = {"pil": images_per_second(pil, indices), "tensor": images_per_second(tensor, indices),
                 f"pil x{cores}": loader_images_per_second(workers)}
        for name, loader in device.items():
            if name == "device cuda":
                rates[name] = loader_images_per_second(loader, torch.cuda.synchronize)
            else:
                torch.set_num_threads(threads[name])
                rates[name] = loader_images_per_second(loader)
                torch.set_num_threads(1)
        return rates

    measure()  # warm-up: page cache, lazy imports, worker start, CUDA context and kernels
    runs = [measure() for _ in range(args.repeats)]

    print(f"SimCLR two views at {args.img_size} px, {len(indices)} train images of {args.dataset} {args.data_dir}, "
          f"median of {args.repeats} (torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{cores} cores{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''})")
    for name in runs[0]:
        rates = [r[name] for r in runs]
        ratio = statistics.median(r[name] / r["pil"] for r in runs)
        print(f"  {name:18s} {statistics.median(rates):8.0f} images/s  {ratio:6.2f}x pil   "
              f"(min {min(rates):.0f}, max {max(rates):.0f})")
    pil_over_tensor = statistics.median(r["pil"] / r["tensor"] for r in runs)
    print(f"  PIL / tensor = {pil_over_tensor:.2f}x   (data.py feeds PIL images: above 1 confirms that choice)")
    print(f"  (device path: batch {args.batch_size}, the images decoded once beforehand in {decode_s:.1f} s, "
          f"{len(indices) / decode_s:.0f} images/s)")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()

"""SimCLR two-view augmentation throughput on ONE CPU core: PIL images vs uint8 tensors.

On CIFAR it is the CPU augmentation that starves a GPU, so data.py feeds its transforms whichever image type
is faster. Both paths run the very same `data.simclr_transform` (torchvision.transforms.v2 dispatches on
the input type) over the same files, read and decoded inside the timed loop, as a DataLoader worker would:
  PIL:    ImageFolder's default loader (PIL.Image.open + convert RGB), PIL kernels   <- data.py's default
  tensor: torchvision.io.decode_image -> uint8 (3, H, W), tensor kernels (decode_image is deprecated in
          torchvision 0.29 in favour of TorchCodec; it still works)
The two are timed alternately, `--repeats` times, and the ratio is the median of the per-repeat ratios
(the machines are shared and noisy: compare within one run only).

    python benchmarks/augment_speed.py                 # ../shared/datasets/cifar10, 2000 train images
    python benchmarks/augment_speed.py --data-dir tests/data_sample --images 1000
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


def decode_rgb(path):
    return decode_image(path, mode=ImageReadMode.RGB)  # uint8 (3, H, W)


def images_per_second(dataset, indices):
    t0 = time.perf_counter()
    for i in indices:
        views, _ = dataset[i]  # read + decode + two augmented views
    return len(indices) / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/datasets/cifar10"), help="ImageFolder tree")
    p.add_argument("--images", type=int, default=2000, help="evenly spaced over the train split (all classes)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core, as one DataLoader worker has

    mean, std = data.MEAN_STD["cifar10"]
    views = data.MultiView(data.simclr_transform(args.img_size, mean, std), n=2)
    pil = data.build_dataset("folder", args.data_dir, "train", transform=views)
    tensor = torchvision.datasets.ImageFolder(Path(args.data_dir) / "train", transform=views, loader=decode_rgb)
    step = max(1, len(pil) // args.images)
    indices = list(range(0, len(pil), step))[:args.images]

    out = [v.shape for v in pil[0][0]], [v.shape for v in tensor[0][0]]
    assert out[0] == out[1], out
    images_per_second(pil, indices), images_per_second(tensor, indices)  # warm-up: page cache, lazy imports
    rates = {"pil": [], "tensor": []}
    for _ in range(args.repeats):
        rates["pil"].append(images_per_second(pil, indices))
        rates["tensor"].append(images_per_second(tensor, indices))
    ratio = statistics.median(a / b for a, b in zip(rates["pil"], rates["tensor"]))

    print(f"SimCLR two views at {args.img_size} px, {len(indices)} images from {args.data_dir}/train, "
          f"1 thread, median of {args.repeats} (torch {torch.__version__}, torchvision {torchvision.__version__})")
    for name, r in rates.items():
        print(f"  {name:6s} {statistics.median(r):7.0f} images/s   (min {min(r):.0f}, max {max(r):.0f})")
    print(f"  PIL / tensor = {ratio:.2f}x   (data.py feeds PIL images: a ratio above 1 confirms that choice)")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()

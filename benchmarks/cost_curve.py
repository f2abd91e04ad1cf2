"""What a training step costs as the image, the patch and the batch grow: images/s and memory, every method.

One axis at a time moves away from a base point (--base: image size, patch size, batch): the image size over
--sizes, the patch size over --patches, the batch over --batches. Every (method, point) runs in a fresh
process: the method file's own train_one_epoch, with the model, optimizer and schedules its main() builds
(as benchmarks/method_speed.py builds "ours"), on CIFAR-10 batches made before the clock starts (PIL path;
larger sizes are upsampled crops; torchvision's CIFAR-10, downloaded into --data-dir when missing, or with
--dataset folder --data-dir DIR an ImageFolder tree), --warmup untimed steps, then --steps timed ones. Per point:
  img/s   images per second over the timed steps (an image: all of its views, as the training log counts)
  MB      the memory the steps take on top of what is in place at the first step (weights, the batches):
          activations, gradients, the optimizer's state. CUDA: peak allocated bytes; CPU: the peak resident set
          (Linux's high-water mark, reset at the first step), which also counts allocator slack.
The tokens column is (size / patch)^2, the sequence the attention is quadratic in; SwAV adds its six small
crops at half the size (a quarter of the tokens).

    python benchmarks/cost_curve.py                                    # CPU: ViT-Tiny, base 32 px, patch 4, batch 64
    python benchmarks/cost_curve.py --device cuda --base 32 4 256 --batches 128 256 512 1024 --steps 10
    python benchmarks/cost_curve.py --methods simclr --arch vit_mini --base 32 8 64   # a quick look
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import data  # noqa: E402
import method_speed  # noqa: E402  (its run_ours builds and times the method file's own step)

METHODS = tuple(method_speed.MODULES)


def points(base, sizes, patches, batches):
    """(size, patch, batch) of every point, the base first, each axis varied alone, no repeats."""
    size, patch, batch = base
    out = [tuple(base)]
    out += [(s, patch, batch) for s in sizes] + [(size, p, batch) for p in patches]
    out += [(size, patch, b) for b in batches]
    return list(dict.fromkeys(out))


def measure(method, size, patch, batch, a):
    """This process: one run of the method at one point; prints its figures as one JSON line."""
    run = SimpleNamespace(dataset=a.dataset, data_dir=a.data_dir, arch=a.arch, patch_size=patch, img_size=size,
                          batch_size=batch, workers=a.workers, device=a.device, warmup=a.warmup, steps=a.steps,
                          cached=True, small_crops=None)
    stats = {}
    rate = method_speed.run_ours(method, run, stats)
    print(json.dumps({"method": method, "size": size, "patch": patch, "batch": batch, "img_s": rate,
                      "step_mb": stats["step_memory"] / 2 ** 20, "threads": torch.get_num_threads()}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--arch", default="vit_tiny", choices=sorted(method_speed.vit.ARCHS))
    p.add_argument("--base", type=int, nargs=3, default=[32, 4, 64], metavar=("SIZE", "PATCH", "BATCH"))
    p.add_argument("--sizes", type=int, nargs="*", default=[64, 96], help="image sizes at the base patch and batch")
    p.add_argument("--patches", type=int, nargs="*", default=[8, 2], help="patch sizes at the base image and batch")
    p.add_argument("--batches", type=int, nargs="*", default=[128, 256, 512], help="batches at the base image/patch")
    p.add_argument("--steps", type=int, default=2, help="timed steps per point")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--workers", type=int, default=1, help="loader workers making the cached batches")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder"],
                   help="torchvision's (downloaded into --data-dir when missing) or an ImageFolder tree (folder); "
                   "default: %(default)s")
    p.add_argument("--data-dir", default="data", help="where the dataset is, or goes (default: %(default)s); its "
                   "train split needs (warmup + steps + 1) x the largest batch images")
    p.add_argument("--out", default=None, help="also append every point as a JSON line to this file")
    p.add_argument("--one", nargs=4, default=None, metavar=("METHOD", "SIZE", "PATCH", "BATCH"),
                   help=argparse.SUPPRESS)  # the child process of one point
    a = p.parse_args(argv)
    if a.one:
        return measure(a.one[0], *map(int, a.one[1:]), a)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        raise SystemExit(f"error: unknown method(s) {sorted(set(methods) - set(METHODS))}: choose from {METHODS}")
    grid = points(a.base, a.sizes, a.patches, a.batches)
    bad = [(s, q) for s, q, _ in grid if s % q or (s // 2) % q]
    if bad:
        raise SystemExit(f"error: the patch size must divide the image size and SwAV's half-size crops: {bad}")

    data.build_dataset(a.dataset, a.data_dir, "train", download=True)  # once, here: the points' processes read it

    rows = {}
    for size, patch, batch in grid:
        for method in methods:
            child = [sys.executable, __file__, "--one", method, str(size), str(patch), str(batch),
                     *[f"--{k}={v}" for k, v in (("arch", a.arch), ("steps", a.steps), ("warmup", a.warmup),
                                                   ("workers", a.workers), ("device", a.device),
                                                   ("dataset", a.dataset),
                                                   ("data-dir", os.path.abspath(a.data_dir)))]]  # cwd: ROOT
            t = time.time()
            r = subprocess.run(child, capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                line = (r.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{method} {size}px/{patch} batch {batch}: failed ({line})", flush=True)
                rows[size, patch, batch, method] = None  # out of memory, for one: the table says so
                continue
            point = json.loads(r.stdout.strip().splitlines()[-1])
            rows[size, patch, batch, method] = point
            print(f"{method:6s} {size:3d} px / patch {patch} batch {batch:4d}: {point['img_s']:8.1f} img/s "
                  f"{point['step_mb']:8.0f} MB  ({time.time() - t:.0f} s)", flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps({**point, "arch": a.arch, "device": a.device}) + "\n")

    print(f"\n{a.arch}, {a.device}, {a.warmup} + {a.steps} timed steps per point, each in a fresh process; "
          f"img/s | MB of the step (see the docstring)\n")
    print("| image | patch | tokens | batch | " + " | ".join(f"{m} img/s | {m} MB" for m in methods) + " |")
    print("|---|---|---|---|" + "---|---|" * len(methods))
    for size, patch, batch in grid:
        cells = []
        for m in methods:
            point = rows[size, patch, batch, m]
            cells += ["failed", ""] if point is None else [f"{point['img_s']:.1f}", f"{point['step_mb']:.0f}"]
        print(f"| {size} | {patch} | {(size // patch) ** 2} | {batch} | " + " | ".join(cells) + " |")
    print(f"\nhardware: {method_speed.hardware(a.device)}")
    print("command: python benchmarks/cost_curve.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()

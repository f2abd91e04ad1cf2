"""Draw the small real-image sample that the tests ship with: tests/data_sample/{train,test}/<class>/*.jpg.

A stratified subset of the project's CIFAR-10 JPEG copy (../shared/datasets/cifar10, an ImageFolder tree):
the same number of files per class, drawn with a fixed seed, copied byte for byte.

    python benchmarks/make_sample.py    # 100 per class from train, 50 per class from test, seed 0
"""
import argparse
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(ROOT.parent / "shared/datasets/cifar10"), help="ImageFolder tree to draw from")
    p.add_argument("--dst", default=str(ROOT / "tests/data_sample"))
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    src, dst = Path(args.src), Path(args.dst)
    if any(dst.glob("*/*/*.jpg")):
        raise SystemExit(f"{dst} already holds images; delete it first to redraw the sample")
    rng = random.Random(args.seed)  # one generator, walked in sorted (split, class) order: reproducible
    for split, k in (("train", args.train_per_class), ("test", args.test_per_class)):
        for cls in sorted(d.name for d in (src / split).iterdir() if d.is_dir()):
            files = sorted((src / split / cls).glob("*.jpg"))
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted(rng.sample(files, k)):
                shutil.copyfile(f, dst / split / cls / f.name)
            print(f"{split}/{cls}: {k} of {len(files)}")


if __name__ == "__main__":
    main()

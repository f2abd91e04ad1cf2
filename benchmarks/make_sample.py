"""Draw the small real-image sample that the tests ship with: tests/data_sample/{train,test}/<class>/*.jpg.

A stratified subset of a CIFAR-10 ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg; the project's
was drawn from a JPEG copy of CIFAR-10, see tests/data_sample/README.md): the same number of files per class,
drawn with a fixed seed, copied byte for byte.

    python benchmarks/make_sample.py --src CIFAR10_TREE   # 100 per class from train, 100 from test, seed 0
"""
import argparse
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="ImageFolder tree to draw from (train/ and test/)")
    p.add_argument("--dst", default=str(ROOT / "tests/data_sample"), help="where the sample goes (default: %(default)s)")
    p.add_argument("--train-per-class", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--test-per-class", type=int, default=100,
                   help="(default: %(default)s: 1,000 test images, so a demo's k-NN has about +-1.5 points of noise)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
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

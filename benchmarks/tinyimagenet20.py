"""Build tinyimagenet20, the study's transfer target, from the public Tiny ImageNet archive.

20 of Tiny ImageNet's 200 classes (Le & Yang 2015; 64x64 crops of ImageNet images), none of them a CIFAR-10
class: 100 train images per class from its train split, 50 test images per class from its labelled val split,
the exact files listed in benchmarks/tinyimagenet20.txt, copied byte for byte into an ImageFolder tree:

    <out>/train/<wnid>/<wnid>_<N>.JPEG   2,000 images
    <out>/test/<wnid>/val_<N>.JPEG       1,000 images
    <out>/classes.tsv                    wnid and WordNet names (tarantula, abacus, pretzel, ...)

    python benchmarks/tinyimagenet20.py --out data/tinyimagenet20            # fetches the archive (237 MB) into data/
    python benchmarks/tinyimagenet20.py --out data/tinyimagenet20 --source ~/tiny-imagenet-200.zip  # or unpacked dir

benchmarks/study.py runs this by itself when its transfer folder is missing.
"""
import argparse
import os
import shutil
import sys
import zipfile

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE = "tiny-imagenet-200.zip"
MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyimagenet20.txt")


def manifest():
    """[(split, wnid, path inside the archive's tiny-imagenet-200/ folder, file name)] in the manifest's order."""
    rows = []
    with open(MANIFEST) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            wnid, part, *numbers = line.split()
            for n in numbers:
                if part == "train":
                    name = f"{wnid}_{n}.JPEG"
                    rows.append(("train", wnid, f"train/{wnid}/images/{name}", name))
                else:
                    name = f"val_{n}.JPEG"
                    rows.append(("test", wnid, f"val/images/{name}", name))
    return rows


class Source:
    """Files of tiny-imagenet-200 read from its zip archive or from the folder it unpacks to."""

    def __init__(self, path):
        self.zip = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else None
        if self.zip is None and not os.path.isdir(os.path.join(path, "train")):
            path = os.path.join(path, "tiny-imagenet-200")  # the folder that holds the unpacked archive
        if self.zip is None and not os.path.isdir(os.path.join(path, "train")):
            raise SystemExit(f"{path}: neither {ARCHIVE} nor the tiny-imagenet-200 folder it unpacks to")
        self.path = path

    def read(self, rel):
        try:
            if self.zip is not None:
                return self.zip.read(f"tiny-imagenet-200/{rel}")
            with open(os.path.join(self.path, rel), "rb") as f:
                return f.read()
        except (KeyError, FileNotFoundError):
            raise SystemExit(f"{rel} is missing from {self.path}: not the Tiny ImageNet archive, or a damaged copy "
                             f"(delete it and run again to fetch it)") from None


def build(out, source=None, download=True, archive_dir="data"):
    """Write the tree into `out` (atomically: a folder named `out` is always complete). `source`: the zip or its
    unpacked folder; None: `archive_dir`/tiny-imagenet-200.zip, fetched there first when missing and `download`."""
    if os.path.exists(os.path.join(out, "classes.tsv")):
        return out
    if source is None:
        source = os.path.join(archive_dir, ARCHIVE)
        if not os.path.exists(source):
            if not download:
                raise SystemExit(f"{out} is missing and {source} is not there to build it from: drop --no-download, "
                                 f"or give --source <tiny-imagenet-200.zip or its unpacked folder>")
            from torchvision.datasets.utils import download_url  # progress bar, resumes nothing, one file
            try:
                download_url(URL, archive_dir, ARCHIVE)
            except OSError as e:
                raise SystemExit(f"downloading {URL} failed ({e}); without internet, put {ARCHIVE} in "
                                 f"{archive_dir} or give --source") from None
    src = Source(source)
    # the val split's labels: val/val_annotations.txt, "<file> <wnid> <box>" per line
    labels = dict(line.split()[:2] for line in src.read("val/val_annotations.txt").decode().splitlines() if line)
    names = dict(line.split("\t", 1) for line in src.read("words.txt").decode().splitlines() if "\t" in line)
    rows = manifest()
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, wnid, rel, name in rows:
        if split == "test" and labels.get(name) != wnid:
            raise SystemExit(f"{rel}: its label in val_annotations.txt is {labels.get(name)}, not {wnid}: "
                             f"not the Tiny ImageNet archive this manifest was written for")
        os.makedirs(os.path.join(tmp, split, wnid), exist_ok=True)
        with open(os.path.join(tmp, split, wnid, name), "wb") as f:
            f.write(src.read(rel))
    wnids = sorted({wnid for _, wnid, _, _ in rows})
    with open(os.path.join(tmp, "classes.tsv"), "w") as f:
        f.writelines(f"{w}\t{names.get(w, '?').strip()}\n" for w in wnids)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    print(f"tinyimagenet20: {len(rows)} images of {len(wnids)} classes in {out}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/tinyimagenet20", help="the tree to write (default: %(default)s)")
    p.add_argument("--source", default=None,
                   help=f"{ARCHIVE} or the folder it unpacks to "
                        f"(default: --archive-dir/{ARCHIVE}, fetched when missing)")
    p.add_argument("--archive-dir", default="data", help="where the archive is kept (default: %(default)s)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch the archive when missing (default: %(default)s)")
    args = p.parse_args(argv)
    build(args.out, args.source, args.download, args.archive_dir)


if __name__ == "__main__":
    sys.exit(main())

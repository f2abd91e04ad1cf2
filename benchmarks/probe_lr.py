"""Choose the linear probe's learning rate without looking at the test split.

The train split is cut into a probe-train part and a stratified validation part (`--val-fraction`, fixed
seed, eval_linear.stratified_split); features are extracted once per model (un-augmented, the model's own
normalization), and every (optimizer, learning rate) pair trains a probe on the first part and is scored on
the second. The test split is never read. eval_linear.PROBE_LR holds the winners; the README gives the table.

    python benchmarks/probe_lr.py --ckpt runs/simclr_cpu3/checkpoint.pt --random-init    # CIFAR-10, fetched into ./data
    python benchmarks/probe_lr.py --ckpt runs/simclr_cpu3/checkpoint.pt --dataset folder --data-dir <ImageFolder tree>
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval_linear  # noqa: E402
import vit  # noqa: E402

GRID = {"sgd": [0.01, 0.03, 0.1, 0.3, 1.0], "adamw": [1e-3, 3e-3, 1e-2, 3e-2]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="*", default=[], help="checkpoints (this repo's or timm state dicts)")
    p.add_argument("--random-init", action="store_true", help="also the untrained network of the first --ckpt")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder"],
                   help="torchvision's (downloaded into --data-dir when missing) or an ImageFolder tree (folder); "
                   "default: %(default)s")
    p.add_argument("--data-dir", default="data", help="where the dataset is, or goes (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=100, help="probe epochs (eval_linear's default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = eval_linear.resolve_device(args.device)

    models = [eval_linear.load_backbone(path) for path in args.ckpt]
    if args.random_init:
        torch.manual_seed(0)
        kw = models[0][1]["vit_kwargs"] if models else vit.vit_mini(img_size=32, patch_size=8).kwargs
        models.insert(0, (vit.VisionTransformer(**kw).eval(), {"method": "random init", "mean_std": None,
                                                               "vit_kwargs": kw}))
    rows = []
    for backbone, meta in models:
        mean_std = meta["mean_std"] or data.MEAN_STD[args.dataset]
        train_set = data.build_dataset(args.dataset, args.data_dir, "train", download=True)
        loader = data.build_eval_loader(train_set, meta["vit_kwargs"]["img_size"], *mean_std, 256, args.workers)
        feats, labels = eval_linear.extract_features(backbone.to(device), loader, device)
        fit, val = eval_linear.stratified_split(labels.cpu(), args.val_fraction, seed=0)
        fit, val = fit.to(device), val.to(device)
        num_classes = data.num_classes(train_set)
        for optimizer, lrs in GRID.items():
            for lr in lrs:
                res = eval_linear.linear_probe(feats[fit], labels[fit], feats[val], labels[val], num_classes,
                                               epochs=args.epochs, lr=lr, optimizer=optimizer)
                rows.append((meta["method"], optimizer, lr, res["top1"]))
                print(f"{meta['method']:12s} {optimizer:5s} lr {lr:<6g} val top-1 {res['top1']:.2f}", flush=True)

    print(f"\nvalidation top-1 ({args.val_fraction:g} of train held out, seed 0; test never read), "
          f"{args.epochs} probe epochs")
    methods = list(dict.fromkeys(r[0] for r in rows))
    print("| optimizer | lr | " + " | ".join(methods) + " | mean |")
    print("|---|---|" + "---|" * (len(methods) + 1))
    for optimizer, lrs in GRID.items():
        for lr in lrs:
            accs = [next(r[3] for r in rows if r[:3] == (m, optimizer, lr)) for m in methods]
            print(f"| {optimizer} | {lr:g} | " + " | ".join(f"{a:.2f}" for a in accs) +
                  f" | {sum(accs) / len(accs):.2f} |")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()

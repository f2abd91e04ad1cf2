"""Training-step speed of our ViT against timm's VisionTransformer of the same size, in the same run.

A step = forward, a scalar loss on the CLS feature, backward, AdamW step. The two models alternate step by
step so that both see the same machine load; the figure is the ratio of median step times (> 1: ours is
faster). On CUDA the forward runs under bf16 autocast and both use scaled_dot_product_attention.

    python benchmarks/vit_speed.py                                   # ViT-Tiny/4, 32 px, CPU: batch 32
    python benchmarks/vit_speed.py --device cuda --batch-size 512    # GPU
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vit  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_tiny", choices=vit.ARCHS)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from timm.models.vision_transformer import VisionTransformer as TimmViT  # test/benchmark-only dependency

    ours = vit.ARCHS[args.arch](img_size=args.img_size, patch_size=args.patch_size)
    k = ours.kwargs
    theirs = TimmViT(img_size=k["img_size"], patch_size=k["patch_size"], embed_dim=k["embed_dim"],
                     depth=k["depth"], num_heads=k["num_heads"], num_classes=0)
    theirs.load_state_dict(ours.state_dict())  # same weights: any difference is the implementation
    device = torch.device(args.device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    models = {"ours": ours.to(device), "timm": theirs.to(device)}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}

    def step(name):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = models[name](x).float().pow(2).mean()
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {n: [] for n in models}
    for i in range(args.steps + 2):
        for name in (("ours", "timm") if i % 2 else ("timm", "ours")):  # alternate who goes first
            t0 = time.perf_counter()
            step(name)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{args.arch}/{args.patch_size} {args.img_size}px batch {args.batch_size} on {device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for n in models:
        print(f"  {n:5s} {med[n] * 1000:8.1f} ms/step  {args.batch_size / med[n]:8.1f} img/s")
    print(f"  speed ratio ours/timm: {med['timm'] / med['ours']:.3f} (> 1: ours faster)")
    print("command: python benchmarks/vit_speed.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()

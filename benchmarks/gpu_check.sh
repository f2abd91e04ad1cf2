#!/usr/bin/env bash
# The GPU checks the issues ask for, as one script for a lent GPU machine (no network there):
#   1. ViT training step vs timm on CUDA (bf16, SDPA), ViT-Tiny/4 at batch 512;
#   2. every method, ViT-Tiny/4 on full CIFAR-10: seconds per epoch and img/s, k-NN after the epochs that fit.
# Pack the data beside the repo first (git-ignored): tar czf .gpu/cifar10.tgz -C ../shared/datasets cifar10
# then run it there with `.gpu` carried:   bash benchmarks/gpu_check.sh [EPOCHS] [METHODS]   (results under $OUT)
#   e.g. bash benchmarks/gpu_check.sh 2 "simclr moco byol swav"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
EPOCHS=${1:-10}
METHODS=${2:-"simclr moco byol swav"}
mkdir -p "$OUT" .gpu/data
[ -d .gpu/data/cifar10 ] || tar xzf .gpu/cifar10.tgz -C .gpu/data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python benchmarks/vit_speed.py --device cuda --batch-size 512 --steps 20 | tee "$OUT/vit_speed.txt"
for m in $METHODS; do
    python "$m.py" --dataset folder --data-dir .gpu/data/cifar10 --arch vit_tiny --patch-size 4 \
        --epochs "$EPOCHS" --warmup-epochs 1 --batch-size 512 --workers 14 --knn-every "$EPOCHS" \
        --out "$OUT/$m" 2>&1 | grep -v "^$m [0-9]" | tee "$OUT/$m.txt"
done

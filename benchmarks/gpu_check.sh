#!/usr/bin/env bash
# The GPU checks the issues ask for, as one script for a lent GPU machine (no network there):
#   1. ViT training step vs timm on CUDA (bf16, SDPA), ViT-Tiny/4 at batch 512;
#   2. augmentation alone: two-view images/s of the PIL path (one core, all cores) and the batched device path;
#   3. every method on both data paths (--aug pil: PIL loader workers; --aug batched), ViT-Tiny/4 on all of CIFAR-10:
#      seconds per epoch and img/s from each run's log, k-NN after the last epoch;
#   4. the cost curve: img/s and memory of every method's step as image, patch and batch grow.
# The machine has no network: pack CIFAR-10 as an ImageFolder tree (cifar10/{train,test}/<class>/*) beside the
# repo first (git-ignored): tar czf .gpu/cifar10.tgz -C <folder holding your cifar10 ImageFolder tree> cifar10
# then run it there with `.gpu` carried:   bash benchmarks/gpu_check.sh [EPOCHS] [METHODS] [PATHS]
#   e.g. bash benchmarks/gpu_check.sh 2 "simclr moco byol swav dino" "pil batched"     (results under $OUT)
# Budget: at 2 epochs the whole script is sized for about 10 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
EPOCHS=${1:-2}
METHODS=${2:-"simclr moco byol swav dino"}
PATHS=${3:-"pil batched"}
WORKERS=$(( $(nproc) - 2 ))
mkdir -p "$OUT" .gpu/data
[ -d .gpu/data/cifar10 ] || tar xzf .gpu/cifar10.tgz -C .gpu/data
DATA=.gpu/data/cifar10
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python benchmarks/vit_speed.py --device cuda --batch-size 512 --steps 20 | tee "$OUT/vit_speed.txt"
python benchmarks/augment_speed.py --dataset folder --data-dir "$DATA" --repeats 3 | tee "$OUT/augment_speed.txt"
for m in $METHODS; do
    for path in $PATHS; do
        flags=(--workers "$WORKERS" --aug "$path")
        python "$m.py" --dataset folder --data-dir "$DATA" --arch vit_tiny --patch-size 4 \
            --epochs "$EPOCHS" --warmup-epochs 1 --batch-size 512 "${flags[@]}" --knn-every "$EPOCHS" \
            --out "$OUT/${m}_$path" 2>&1 | grep -v "^$m [0-9]" | tee "$OUT/${m}_$path.txt"
        # seconds per epoch and img/s of every epoch, from the run's log (its epoch-0 line: the untrained k-NN)
        python -c "import json,sys; [print(sys.argv[2], e['epoch'], round(e['seconds'], 1), 's', round(e['img_per_s']), \
'img/s', e.get('knn_top1') or '') if 'seconds' in e else print(sys.argv[2], e['epoch'], 'untrained k-NN', \
e.get('knn_top1')) for e in map(json.loads, open(sys.argv[1]))]" "$OUT/${m}_$path/log.jsonl" \
            "${m}_$path" | tee -a "$OUT/epochs.txt"
    done
done
python benchmarks/cost_curve.py --device cuda --base 32 4 256 --sizes 64 96 --patches 8 2 --batches 128 512 1024 \
    --steps 10 --warmup 3 --workers "$WORKERS" --dataset folder --data-dir "$DATA" --out "$OUT/cost_curve.jsonl" \
    | tee "$OUT/cost_curve.txt"

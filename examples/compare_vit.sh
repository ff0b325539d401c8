#!/usr/bin/env bash
# The rules over the small ViT: vit_cifar at K=3 in equal groups (bp: K=1) on the CIFAR-10
# shards, one fixed short budget, the same seeds, data and schedule for every rule; then a
# markdown table of the runs.
#   bash examples/compare_vit.sh [OUT_DIR] [SEEDS]      (defaults: runs/compare_vit, 0,1,2)
# Budget: 1,024 train images, 2 epochs, batch 32 (64 steps), AdamW lr 1e-3 (weight decay 0.05
# on weights only, 5% warm-up, cosine), 500 test images, one thread per run. The script calls
# `localearn` and `python`: put .venv/bin first on PATH.
set -euo pipefail
out=${1:-runs/compare_vit}
seeds=${2:-0,1,2}
data=${DATA:-../shared/data/cifar10}
rules=${RULES:-"bp dgl man(dgl) mlaan(dgl,k=2)"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for rule in $rules; do
  slug=$(echo "$rule" | tr -c 'a-z0-9=\n' '_')
  k=3; [ "$rule" = bp ] && k=1
  if [ -f "$out/$slug/seeds.json" ]; then echo "done: $rule"; continue; fi
  localearn fit --rule "$rule" --model vit_cifar --k "$k" --split groups \
    --dataset cifar10-shards --data-dir "$data" --train-limit 1024 --test-limit 500 \
    --epochs 2 --batch-size 32 --optimizer adamw --lr 0.001 --weight-decay 0.05 \
    --no-progress --seeds "$seeds" --output-dir "$out/$slug"
done
python "$(dirname "$0")/results_table.py" "$out"

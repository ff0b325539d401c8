#!/usr/bin/env bash
# The rules over the small ViT: vit_cifar at K=3 in equal groups (bp: K=1) on the CIFAR-10
# shards, one fixed short budget, the same seeds, data and schedule for every rule; then a
# markdown table of the runs (examples/compare_rules.sh with this network and budget).
#   bash examples/compare_vit.sh [OUT_DIR] [SEEDS]      (defaults: runs/compare_vit, 0,1,2)
# Budget: 1,024 train images, 2 epochs, batch 32 (64 steps), AdamW lr 1e-3 (weight decay 0.05
# on weights only, 5% warm-up, cosine), 500 test images, one thread per run. The script calls
# `localearn` and `python`: put .venv/bin first on PATH.
set -euo pipefail
export RULES=${RULES:-"bp dgl man(dgl) mlaan(dgl,k=2)"} MODEL=vit_cifar K=3
export BUDGET="--split groups --train-limit 1024 --test-limit 500 --epochs 2 --batch-size 32
  --optimizer adamw --lr 0.001 --weight-decay 0.05"
exec bash "$(dirname "$0")/compare_rules.sh" "${1:-runs/compare_vit}" "${2:-0,1,2}"

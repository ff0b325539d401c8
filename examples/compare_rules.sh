#!/usr/bin/env bash
# The rules compared: ResNet-32 K=16 (bp: K=1) on the CIFAR-10 shards, one fixed short budget,
# the same seed, data and schedule for every rule; then a markdown table of the runs.
#   bash examples/compare_rules.sh [OUT_DIR] [SEEDS]      (defaults: runs/compare, 0)
# Budget: 3,000 train images, 2 epochs, batch 128, lr 0.1 (cosine, 5% warm-up), 1,000 test
# images, one thread per run. Extra seeds of some rules (the seeds are the second argument):
#   RULES="dgl mlaan(dgl)" bash examples/compare_rules.sh runs/compare_seeds 1,2
# The family comparison of docs/results.md: RULES="dgl bp infopro auglocal man(dgl)
# hpff(dgl) mlaan(dgl)" bash examples/compare_rules.sh runs/compare15 0. MODEL, K and BUDGET
# (the fit flags after the data) set another network and budget, as examples/compare_vit.sh
# does. The script calls `localearn` and `python`: put .venv/bin first on PATH.
set -euo pipefail
out=${1:-runs/compare}
seeds=${2:-0}
data=${DATA:-../shared/data/cifar10}
rules=${RULES:-"bp dgl mlaan(dgl) mlaan(dgl,short_cascades=true) mlaan(linear,k=2) mlaan(dgl(style=public)) mlm(dgl) lam(dgl)"}
model=${MODEL:-resnet32}
modules=${K:-16}
read -r -d "" -a budget <<<"${BUDGET:-"--train-limit 3000 --test-limit 1000 --epochs 2 --batch-size 128 --lr 0.1 --channels-last"}" || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for rule in $rules; do
  slug=$(echo "$rule" | tr -c 'a-z0-9=\n' '_')
  k=$modules; [ "$rule" = bp ] && k=1
  if [ -f "$out/$slug/seeds.json" ]; then echo "done: $rule"; continue; fi
  localearn fit --rule "$rule" --model "$model" --k "$k" --dataset cifar10-shards \
    --data-dir "$data" "${budget[@]}" --no-progress --seeds "$seeds" --output-dir "$out/$slug"
done
python "$(dirname "$0")/results_table.py" "$out"

#!/usr/bin/env bash
# GPU evidence in one markdown report: the device, the GPU tests, `localearn memory` at the
# paper's Table III settings, `localearn bench` for bp/dgl/mlaan(dgl), `localearn frontier` (its
# PNG beside the report), ViT-S/16 memory and speed of local rules against BP, and a short
# CIFAR-10 training of bp and mlaan(dgl) with --data-on-device. Sized for under 8 minutes on
# one H100.
#
#   benchmarks/gpu_check.sh [REPORT] [DATA_DIR]
#     REPORT    the markdown file to write (default: gpu-report.md)
#     DATA_DIR  the CIFAR-10 WebDataset shards (default: ../shared/data/cifar10)
#
# Environment: DEVICE (default cuda), PYTHON (default .venv/bin/python, else python3),
# GPU_CHECK_TINY=1 (a few steps and a few hundred images: the CPU run of the test suite),
# FIT_EPOCHS (default 2), WORKERS (shard decoding processes, default 8), CMD_TIMEOUT (seconds
# per command, default 300). Every command runs even when an earlier one failed; the script
# exits 1 when any failed, and the report says which.
set -u -o pipefail

here=$(pwd)
abs() { case "$1" in /*) echo "$1" ;; *) echo "$here/$1" ;; esac; }
REPORT=$(abs "${1:-gpu-report.md}")
PLANE="${REPORT%.md}-frontier.png"
DATA=$(abs "${2:-../shared/data/cifar10}")
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}
TINY=${GPU_CHECK_TINY:-0}
CMD_TIMEOUT=${CMD_TIMEOUT:-300}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ "$TINY" = 1 ]; then
    TESTS=(tests/test_on_device.py)
    MEMORY_CONFIGS=(examples/configs/table3/cifar10-resnet32-mlaan.toml)
    MEMORY_EXTRA=(--batch-size 4 --steps 1 --no-rss-pass)
    BENCH=(--batch-size 4 --warmup 1 --steps 2)
    FRONTIER=(--rule bp --rule dgl --k 4 --batch-size 4 --memory-steps 1 --warmup 0 --steps 1)
    FIT=(--epochs 1 --batch-size 32 --train-limit 96 --test-limit 64 --workers 0)
    FIT_K=4
    VIT=(--model vit_cifar --k 3 --batch-size 4)
    VIT_MEMORY=(--steps 1 --no-rss-pass)
    VIT_RULES=(dgl)
    VIT_BENCH=()
else
    TESTS=(tests)
    MEMORY_CONFIGS=(examples/configs/table3/*.toml)
    MEMORY_EXTRA=()
    BENCH=(--batch-size 1024 --warmup 3 --steps 10)
    FRONTIER=(--k 16 --batch-size 1024 --warmup 3 --steps 10)
    FIT=(--epochs "${FIT_EPOCHS:-2}" --batch-size 128 --workers "${WORKERS:-8}")
    FIT_K=16
    VIT=(--model vit_small --input-size 224 --num-classes 1000 --k 4 --batch-size 256)
    VIT_MEMORY=()
    VIT_RULES=(dgl "manpp(linear(pool=cls, norm=true), depth=2)" "mlaan(dgl, k=2)")
    VIT_BENCH=(--warmup 3 --steps 10)
fi

failed=0
say() { printf '%s\n' "$@" >>"$REPORT"; }
# a command as one would type it: words with shell characters in single quotes
echo_cmd() {
    local word line=""
    for word in "$@"; do
        if [[ ! "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            word="'${word//\'/\'\\\'\'}'"
        fi
        line+="$word "
    done
    echo "${line% }"
}

# run TITLE CMD...: the command and its output (stdout and stderr) in the report
run() {
    local title=$1 rc start
    shift
    echo "gpu_check: $title" >&2
    say "### $title" ""
    say '```console' "\$ $(echo_cmd "$@")"
    start=$(date +%s)
    timeout "$CMD_TIMEOUT" "$@" >"$WORK/out" 2>&1
    rc=$?
    # progress lines and the profiler's own chatter are noise in a report
    grep -v -e '^USDT:' -e $'\r' "$WORK/out" >>"$REPORT"
    say '```' ""
    say "exit status $rc, $(($(date +%s) - start)) s" ""
    if [ "$rc" != 0 ]; then failed=$((failed + 1)); fi
    return "$rc"
}

: >"$REPORT"
say "# GPU check" ""
tiny=$([ "$TINY" = 1 ] && echo ', tiny settings (GPU_CHECK_TINY=1)')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
when=$(date -u '+%Y-%m-%d %H:%M UTC')
say "Made by \`benchmarks/gpu_check.sh\` on $when, device \`$DEVICE\`$tiny, commit \`$commit\`." ""

say "## Device" ""
if command -v nvidia-smi >/dev/null; then
    run "nvidia-smi" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
run "torch" "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'

say "## GPU tests" ""
say "The tests named \`*cuda*\`; each skips itself without CUDA." ""
run "pytest -k cuda" "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda -rs "${TESTS[@]}"

say "## Memory at the paper's Table III settings" ""
say "Each row is one \`[memory]\` table of \`examples/configs/table3\`, measured by" \
    "\`localearn memory --device $DEVICE --json\` (on CUDA: \`torch.cuda.max_memory_allocated\`)."
say ""
for config in "${MEMORY_CONFIGS[@]}"; do
    name=$(basename "$config" .toml)
    mapfile -t flags < <("$PYTHON" - "$config" <<'EOF'
import sys, tomllib
for key, value in tomllib.load(open(sys.argv[1], "rb"))["memory"].items():
    print("--" + key.replace("_", "-"))
    print(value)
EOF
)
    run "memory: $name" "$PYTHON" -m localearn memory "${flags[@]}" "${MEMORY_EXTRA[@]}" \
        --device "$DEVICE" --json >/dev/null
    cp "$WORK/out" "$WORK/memory-$name.json" 2>/dev/null
done
say "#### Memory summary" ""
"$PYTHON" - "$WORK" "${MEMORY_CONFIGS[@]}" >>"$REPORT" <<'EOF'
import json, re, sys
from pathlib import Path
work = Path(sys.argv[1])
print("| setting | paper (GB) | peak here (GB) | method |")
print("| --- | --- | --- | --- |")
for config in sys.argv[2:]:
    name = Path(config).stem
    paper = re.search(r"Reproduces ([\d.]+) GB", Path(config).read_text())
    try:
        text = (work / f"memory-{name}.json").read_text()
        rule = json.loads(text[text.index("{"):])["rule"]
        peak, method = f"{rule['peak_bytes'] / 1e9:.2f}", rule["peak_method"]
    except (OSError, ValueError, KeyError):
        peak, method = "failed", "-"
    print(f"| {name} | {paper.group(1) if paper else '-'} | {peak} | {method} |")
print()
EOF

say "## Speed: localearn bench" ""
run "bench: dgl vs bp" "$PYTHON" -m localearn bench --rule dgl --model resnet32 --k 16 \
    --vs bp "${BENCH[@]}" --device "$DEVICE"
run "bench: mlaan(dgl) vs bp" "$PYTHON" -m localearn bench --rule "mlaan(dgl)" \
    --model resnet32 --k 16 --vs bp "${BENCH[@]}" --device "$DEVICE"

say "## Memory and time against BP: localearn frontier" ""
say "Peak memory (as \`localearn memory\`) and step time (as \`localearn bench\`) of each rule" \
    "against BP, ResNet-32; the plane is in \`$(basename "$PLANE")\` beside this report." ""
run "frontier" "$PYTHON" -m localearn frontier --model resnet32 "${FRONTIER[@]}" \
    --device "$DEVICE" -o "$PLANE" --overwrite

say "## Transformers" ""
say "A ViT cut into equal groups of blocks (\`--split groups\`): peak memory and step time of" \
    "local rules against BP (full run: ViT-S/16 at 224x224, K=4, batch 256)." ""
for rule in "${VIT_RULES[@]}"; do
    run "memory: $rule over a ViT vs bp" "$PYTHON" -m localearn memory --rule "$rule" \
        "${VIT[@]}" --split groups --vs bp "${VIT_MEMORY[@]}" --device "$DEVICE"
done
if [ "${#VIT_BENCH[@]}" != 0 ]; then
    run "bench: dgl over a ViT vs bp" "$PYTHON" -m localearn bench --rule dgl "${VIT[@]}" \
        --split groups --vs bp "${VIT_BENCH[@]}" --device "$DEVICE"
fi

say "## CIFAR-10 training with --data-on-device" ""
say "ResNet-32 on the CIFAR-10 shards in \`$DATA\`, training images kept on the device." ""
for rule in bp "mlaan(dgl)"; do
    k=$([ "$rule" = bp ] && echo 1 || echo "$FIT_K")
    out="$WORK/fit-${rule//[()]/}"
    run "fit: $rule" "$PYTHON" -m localearn fit --rule "$rule" --model resnet32 --k "$k" \
        --dataset cifar10-shards --data-dir "$DATA" --data-on-device "${FIT[@]}" \
        --device "$DEVICE" --no-progress --out "$out"
done
say "#### Training summary" ""
"$PYTHON" - "$WORK"/fit-* >>"$REPORT" <<'EOF'
import json, sys
from pathlib import Path
print("| run | test accuracy (last) | best | images/s | wall time (s) | peak memory (MiB) |")
print("| --- | --- | --- | --- | --- | --- |")
for folder in map(Path, sys.argv[1:]):
    try:
        s = json.loads((folder / "summary.json").read_text())
        print(f"| {s['rule']} K={s['k']}, {s['epochs']} epochs on {s['device']} | "
              f"{s['last_test_acc']:.2%} | "
              f"{s['best_test_acc']:.2%} | {s['images_per_s']:.0f} | {s['wall_time_s']:.0f} | "
              f"{s['peak_mem_mb']:.0f} |")
    except (OSError, ValueError, KeyError) as exc:
        print(f"| {folder.name} | failed ({type(exc).__name__}) | | | | |")
print()
EOF

say "## Result" ""
if [ "$failed" = 0 ]; then say "Every command succeeded."; else say "$failed command(s) failed."; fi
echo "gpu_check: wrote $REPORT ($failed failed)" >&2
[ "$failed" = 0 ]

#!/usr/bin/env bash
# The GPU check in one script: on a fresh single-GPU machine with no network, run the throughput benchmark and
# both experiments at the original's settings on CIFAR-10's images, writing every figure into one folder.
#
#   bash benchmarks/gpu.sh [DATA] [OUT]
#
# DATA: the CIFAR-10 tarball from ../shared (default) or an unpacked ImageFolder/cifar-10-batches-py folder.
# OUT:  the results folder (default gpu-results; refused if it exists, so earlier figures are never lost).
# Packages: wheels in .whl/ (jax, jaxlib, jax-cuda12-plugin, jax-cuda12-pjrt, flax, optax, orbax-checkpoint, ...)
# are installed offline when present; otherwise `pip install -e ".[cuda12]"` uses the package index.
# WEIGHTS: a torchvision resnet18-f37072fd.pth for the fine-tune (default: random initialisation, labelled so).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/cifar10-jpeg-train.tar.gz}"
out="${2:-gpu-results}"
if [ -e "$out" ]; then echo "error: $out exists; pass another results folder" >&2; exit 2; fi
mkdir -p "$out"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  python3 -m pip install -q -e ".[cuda12]"
fi
if [ -f "$data" ]; then
  unpacked="$(mktemp -d)"; tar xzf "$data" -C "$unpacked"; data="$unpacked/cifar10-jpeg"
fi
export CIFARJAX_CACHE="$out/cache"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import jax; print(jax.devices())"; } \
  > "$out/device.txt"
start=$(date +%s)
python3 -m benchmarks.throughput --data-dir "$data" --json > "$out/throughput.json"
python3 -m experiments.cnn --data-dir "$data" --out "$out/cnn" 2> "$out/cnn.log"
python3 -m experiments.finetune --data-dir "$data" --weights "${WEIGHTS:-random}" --out "$out/finetune" 2> "$out/finetune.log"
echo "total seconds: $(( $(date +%s) - start ))" | tee "$out/total.txt"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for name in ("cnn/summary.json", "finetune/summary.json"):
    print(name, json.dumps(json.load(open(f"{out}/{name}")))[:600])
for row in json.load(open(f"{out}/throughput.json"))["rows"]:
    print(f"{row['name']:60s} {row['cifarjax']:>10} {row['pytorch']:>10} x{row['ratio']}")
PY

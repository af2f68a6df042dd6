#!/usr/bin/env bash
# The first GPU run, in one script and at most 10 minutes on one GPU (H100/H200): every figure into one folder,
# each part under its own time limit, a summary at the end. Judge the figures against
# benchmarks/GPU_PREDICTIONS.md.
#
#   bash benchmarks/gpu.sh [DATA] [OUT]
#
# DATA: the CIFAR-10 archive (cifar10-jpeg-train.tar.gz, unpacked into OUT first), an unpacked folder
#       (data/cifar10-jpeg) or a folder holding cifar-10-batches-py. Default: data/cifar10-jpeg.
# OUT:  the results folder (default gpu-results-<time>); refused if it exists, so earlier figures are never lost.
# Packages: used as installed when `import cifarjax` works and JAX sees a GPU; else wheels in .whl/ are installed
# offline, else `pip install -e ".[cuda12]"` (outside the 10 minutes).
#
# Parts, in order of importance (a part that fails or runs out of time is recorded and the next one runs); their
# limits add up to 560 s, under the 570 s deadline (tests/test_benchmarks.py checks it):
#   1. SimpleCNN, one epoch: fp32 (TF32 on the GPU) one step per call; bf16 one step per call and auto (0)
#   2. per-step rates of SimpleCNN (fp32, bf16) and one jax.profiler trace of 20 bf16 steps (trace/)
#   3. the ResNet-18 224x224 throughput row, beside PyTorch on whatever device torch_reference chose
#   4. 224x224 fine-tunes, one epoch: all layers (bf16; fp32 on 8,000 images), the head with train-mode BatchNorm
#      (bf16), all layers with --augment albumentations (bf16, 8,000 images)
#   5. the cached fine-tune (experiments.finetune --recipe frozen-bn --weights random; WEIGHTS=path for ImageNet)
#   6. a 20-epoch SimpleCNN run at the original's settings (fp32, the default steps per call)
#   7. --deterministic: 2 epochs of a subset uninterrupted, and 1 then resumed to 2: bit-identical? (resume_equal.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
deadline=$(( start + ${GPU_SH_SECONDS:-570} ))   # 30 s kept for the summary and the machine's own start
data="${1:-data/cifar10-jpeg}"
out="${2:-gpu-results-$(date -u +%Y%m%dT%H%M%SZ)}"
if [ -e "$out" ]; then echo "error: $out exists; pass another results folder" >&2; exit 2; fi
mkdir -p "$out/logs"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export CIFARJAX_CACHE="$out/cache"   # decoded images and compiled programs: this run's own, so times are cold-start

# GPU_SH_ON_CPU=1 runs the script on the CPU with the packages installed (a rehearsal on a small data folder).
if [ -z "${GPU_SH_ON_CPU:-}" ] && ! python3 -c "import cifarjax, jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
  else
    python3 -m pip install -q -e ".[cuda12]"
  fi
  start=$(date +%s); deadline=$(( start + ${GPU_SH_SECONDS:-570} ))   # the install is outside the 10 minutes
fi
if [ -f "$data" ]; then
  tar xzf "$data" -C "$out" && data="$out/cifar10-jpeg"
fi

# part NAME CAP_SECONDS COMMAND...: run under min(CAP, time left), log to logs/NAME.log, record its status and time.
part() {
  local name=$1 cap=$2; shift 2
  local left=$(( deadline - $(date +%s) )) t0 rc
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then echo "$name skipped (no time left)" | tee -a "$out/parts.txt"; return; fi
  t0=$(date +%s.%N)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out/logs/$name.log" 2>&1; rc=$?
  printf '%-22s rc=%-3s %6.1f s (limit %s s)\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" "$limit" \
    | tee -a "$out/parts.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())"
  git rev-parse HEAD; nproc; } > "$out/device.txt" 2>&1

# 1. One SimpleCNN epoch, three ways (the first also decodes the images into the cache).
part cnn-epoch-fp32-k1 65 python3 -m experiments.cnn --data-dir "$data" --epochs 1 --precision fp32 \
  --steps-per-call 1 --out "$out/cnn-epoch-fp32-k1"
part cnn-epoch-bf16-k1 30 python3 -m experiments.cnn --data-dir "$data" --epochs 1 --precision bf16 \
  --steps-per-call 1 --out "$out/cnn-epoch-bf16-k1"
part cnn-epoch-bf16-auto 30 python3 -m experiments.cnn --data-dir "$data" --epochs 1 --precision bf16 \
  --steps-per-call 0 --out "$out/cnn-epoch-bf16-auto"

# 2. Step rates without the command around them, and one profile trace (open with TensorBoard's profile plugin
#    or Perfetto: trace/plugins/profile/*/*.xplane.pb).
part step-rates-and-trace 20 python3 - "$data" "$out" <<'PY'
import json, sys
from pathlib import Path
import jax
from benchmarks.throughput import CifarjaxRow
from cifarjax.data import load_dataset, train_val_split
data, out = sys.argv[1], Path(sys.argv[2])
train, _ = train_val_split(load_dataset(data))
rates = {}
for precision in ("fp32", "bf16"):
    row = CifarjaxRow("train", 64, {"precision": precision}, train.images, train.labels)  # compiled and warmed up
    rates[f"cnn_train_64_{precision}"] = round(max(row.rate() for _ in range(5)), 1)
    print(precision, rates[f"cnn_train_64_{precision}"], "images/s", flush=True)
    (out / "step_rates.json").write_text(json.dumps(rates, indent=1))  # kept if the trace runs out of time
row.steps = 20
with jax.profiler.trace(str(out / "trace")):
    rates["cnn_train_64_bf16_traced"] = round(row.rate(), 1)
(out / "step_rates.json").write_text(json.dumps(rates, indent=1))
PY

# 3. The ResNet-18 224x224 row (fp32, batch 32) beside PyTorch eager on the device it chose (recorded in the row).
part throughput-resnet_all_224 60 sh -c "exec python3 -m benchmarks.throughput --json --data-dir '$data' \
  --rows resnet_all_224 > '$out/throughput-resnet_all_224.json'"

# 4. 224x224 fine-tunes, one epoch each (no feature cache: the backbone runs every step).
ft224() { local name=$1 cap=$2; shift 2
  part "$name" "$cap" python3 -m experiments.finetune --data-dir "$data" --weights random --img-size 224 --epochs 1 \
    --out "$out/$name" "$@"; }
ft224 ft224-all-bf16 65 --unfreeze all --precision bf16
ft224 ft224-all-fp32-8000 50 --unfreeze all --precision fp32 --subset 8000
ft224 ft224-head-bntrain-bf16 60 --unfreeze head --bn train --precision bf16
ft224 ft224-all-bf16-albumentations-8000 45 --unfreeze all --precision bf16 --augment albumentations --subset 8000

# 5. The cached fine-tune (frozen-bn): the head on cached features, 20, 50 and 100 epochs. The original's own
#    (train-mode BatchNorm, the backbone forward every step) is part 4's head row at 224.
part finetune 40 python3 -m experiments.finetune --data-dir "$data" --weights "${WEIGHTS:-random}" --recipe frozen-bn \
  --out "$out/finetune"

# 6. Twenty epochs at the original's settings.
part cnn-20-epochs 35 python3 -m experiments.cnn --data-dir "$data" --out "$out/cnn-20-epochs"

# 7. A resumed run against an uninterrupted one, with XLA's deterministic kernels.
resume_check() {  # DATA OUT (a function run by `part` through bash -c)
  local out=$2 common=(--data-dir "$1" --subset 2000 --batch-size 64 --deterministic)
  python3 -m experiments.cnn "${common[@]}" --epochs 2 --out "$out/deterministic-full" &&
  python3 -m experiments.cnn "${common[@]}" --epochs 1 --out "$out/deterministic-resumed" &&
  python3 -m experiments.cnn --resume --epochs 2 --out "$out/deterministic-resumed" &&
  python3 - "$out" <<'PY'
import sys
from pathlib import Path
import jax, numpy as np
from cifarjax.checkpoint import load_variables
out = Path(sys.argv[1])
a, b = (jax.tree.leaves(load_variables(out / f"deterministic-{n}")) for n in ("full", "resumed"))
equal = all(np.array_equal(x, y) for x, y in zip(a, b))
worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(a, b))
(out / "resume_equal.txt").write_text(f"bit-identical: {equal} (largest difference {worst:g})\n")
PY
}
export -f resume_check
part resume-deterministic 60 bash -c 'resume_check "$@"' _ "$data" "$out"

echo "total seconds: $(( $(date +%s) - start ))" | tee -a "$out/parts.txt"
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print((out / "device.txt").read_text().strip().splitlines()[:2])
print((out / "parts.txt").read_text())
def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
for run in sorted(out.glob("cnn-*")) + sorted(out.glob("ft224-*")) + [out / "finetune"]:
    s = load(run / "summary.json")
    if s is None:
        print(f"{run.name:24s} no summary.json (see logs/)")
        continue
    keys = ("val_accuracy", "process_seconds", "images_per_second", "phases", "peak_rss_mb", "runs")
    print(f"{run.name:24s}", json.dumps({k: s[k] for k in keys if k in s})[:400])
print("step rates:", load(out / "step_rates.json"))
resumed = out / "resume_equal.txt"
print("resumed with --deterministic:", resumed.read_text().strip() if resumed.is_file() else "not run (see logs/)")
for path in sorted(out.glob("throughput-*.json")):
    result = load(path)
    for r in (result or {}).get("rows", []):
        print(f"{r['name']:24s} cifarjax {r['cifarjax']:>10} images/s  PyTorch on {r.get('pytorch_device', '?')} "
              f"{r['pytorch']:>8}")
print("compare with benchmarks/GPU_PREDICTIONS.md")
PY

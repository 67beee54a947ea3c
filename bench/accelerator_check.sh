#!/usr/bin/env bash
# The train step on one accelerator, against the official PyTorch step on the same chip.
#
# ResNet-50 + projector 8192-8192-8192, bf16, 224 px, synthetic views, per-device batch
# 64, 128 and 256: bt_jax image pairs/s, model FLOP utilisation against the chip's dense
# bf16 peak (bench/common.py PEAK_TFLOPS; --peak-tflops overrides it), peak memory, and the
# official PyTorch step's pairs/s (bf16 autocast, channels_last), measured in the same
# process with interleaved repeats. About 5 minutes on one H100-class GPU (8 at most).
# Needs jax (with CUDA), flax, optax, orbax and torch; no TensorFlow, no network.
#
#   bench/accelerator_check.sh                      # on the GPU machine
#   bench/accelerator_check.sh --peak-tflops 989    # a chip the table does not know
#   bench/accelerator_check.sh --dry-run            # the same code on the CPU, toy sizes
#
# Results: one JSON per batch size in --out (default /tmp/bt_accelerator_check).
set -euo pipefail

dry_run=0
peak_tflops=0
out=/tmp/bt_accelerator_check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --peak-tflops) peak_tflops="$2"; shift ;;
    --peak-tflops=*) peak_tflops="${1#*=}" ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#*=}" ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "accelerator_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
mkdir -p "$out"
rm -f "$out"/batch_*.json
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torch allocates on the same GPU in the same process: no up-front grab of device memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2

if [ "$dry_run" = 1 ]; then
  batches=(8)
  model=(--arch=resnet18 --width=0.125 "--stage_sizes=1,1" --projector=64-64-64 --image_size=32)
  timing=(--steps=2 --repeats=1 --warmup=1)
  limit_s=300
else
  batches=(64 128 256)
  model=(--arch=resnet50 --projector=8192-8192-8192 --image_size=224)
  timing=(--steps=5 --repeats=3 --warmup=2)
  limit_s=150
fi

command -v nvidia-smi > /dev/null && nvidia-smi -L
for batch in "${batches[@]}"; do
  echo "== per-device batch $batch"
  timeout "$limit_s" python bench/train_step.py --config=configs/imagenet.py --synthetic \
    --baseline=torch --dtype=bfloat16 --batch="$batch" "${model[@]}" "${timing[@]}" \
    --matmul_size=0 --peak_tflops="$peak_tflops" --json="$out/batch_$batch.json" \
    || echo "per-device batch $batch: failed or ran past ${limit_s} s (out of memory?)"
done

python - "$out" << 'EOF'
import glob, json, os, sys

sys.path.insert(0, "bench")
import common

rows = []
for path in glob.glob(os.path.join(sys.argv[1], "batch_*.json")):
    with open(path) as f:
        r = json.load(f)
    step, base = r["device_step"], r.get("baseline") or {}
    mib = lambda b: f"{b / 2**20:,.0f}" if b else "-"
    rows.append([
        r["setup"]["global_batch"],
        step["pairs_per_s"],
        f"{100 * r['mfu']:.3g}" if "mfu" in r else "- (peak unknown: --peak-tflops)",
        f"{mib(step['peak_memory_bytes'])} ({step['peak_memory_source']})",
        base.get("pairs_per_s", "- (no torch)"),
        mib(base.get("peak_memory_bytes")),
        f"{r['bt_jax_over_baseline']:.2f}x" if base else "-",
    ])
if not rows:
    sys.exit("accelerator_check: no batch size finished")
print("\n" + r["setup"]["description"].replace(f", batch {r['setup']['global_batch']}", ""))
print(common.table(sorted(rows), [
    "batch/device", "bt_jax pairs/s", "MFU %", "bt_jax peak MiB", "PyTorch pairs/s",
    "PyTorch peak MiB", "bt_jax / PyTorch",
]))
EOF

#!/usr/bin/env bash
# Every GPU measurement in one call, on a machine with 4 GPUs (the device tool's nvidia-h200-x4):
#   1. the layout-invariance tests on NCCL, one GPU per rank (TP1 vs TP2, EP2, TP2xEP2, ETP1, split DP data)
#   2. forward overhead of calibrating / quantizing mode (bench_forward.py, one GPU)
#   3. TP2 x EP2 calibration + export of the built-in ~1.1B-parameter MoE (moe-1b, random weights) on 4 GPUs
#   4. one amax sync of 10,000 quantizers on 4 ranks over NCCL (bench_sync.py)
#   5. the kernels: NVFP4 fake quant vs copy bandwidth and ModelOpt; MSE sweep vs reference, floor, ModelOpt
# Results are appended to $RESULTS (default benchmarks/RESULTS.md); everything printed goes to $LOGS/run_gpu.log.
# ModelOpt and megatron-core 0.19 come as wheels (benchmarks/fetch_wheels.sh) installed into PYTHONPATH first.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
LOGS=${LOGS:-/tmp/dist_quant_gpu}
mkdir -p "$LOGS"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
LOG="$LOGS/run_gpu.log"
TABLE="$LOGS/table.md"
printf '| step | exit | seconds |\n|---|---|---|\n' > "$TABLE"
status=0
step() {
  local name=$1 start rc
  shift
  start=$(date +%s)
  echo "===== $name: $*" >> "$LOG"
  "$@" >> "$LOG" 2>&1
  rc=$?
  echo "| $name | $rc | $(( $(date +%s) - start )) |" | tee -a "$TABLE"
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi -L >> "$LOG" 2>&1
step nccl_layout_invariance env DIST_QUANT_TEST_BACKEND=nccl python3 -m pytest -q -p no:cacheprovider tests/distributed/test_layout_invariance.py
step bench_forward python3 benchmarks/bench_forward.py --results "$RESULTS"
OUT_1B=${OUT_1B:-/tmp/moe-1b-nvfp4}
E2E=(python3 -m torch.distributed.run --nproc-per-node 4 -m dist_quant.cli calibrate --model moe-1b --dtype bfloat16
     --recipe nvfp4_default-fp8_cast_kv --tp 2 --ep 2 --calib-samples 64 --seq-len 256 --out "$OUT_1B" --overwrite)
step moe_1b_tp2xep2 "${E2E[@]}"
step moe_1b_inspect python3 -m dist_quant.cli inspect "$OUT_1B"
{
  echo
  echo "## main job on 4 GPUs: moe-1b (random weights), TP2 x EP2, NCCL ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "- GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
  echo "- command: \`${E2E[*]}\`"
  echo
  echo '```'
  tr '\r' '\n' < "$LOG" | sed -n '/dist-quant calibrate: moe-1b/,/checkpoint:/p'  # tqdm's \r share lines
  tr '\r' '\n' < "$LOG" | sed -n '/: NVFP4 weights/,/verify:/p'
  echo '```'
} >> "$RESULTS"
step bench_sync python3 benchmarks/bench_sync.py --backend nccl --peer-repeats 3 --results "$RESULTS"
step bench_numerics python3 benchmarks/bench_numerics.py --no-sweep --results "$RESULTS"
step bench_mse python3 benchmarks/bench_mse.py --no-sweep --results "$RESULTS"
cat "$TABLE"
exit $status

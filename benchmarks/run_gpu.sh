#!/usr/bin/env bash
# Every GPU measurement in one call, on the GPUs the machine has (2 or 4; one GPU per rank):
#   layout   the layout-invariance tests on NCCL, the layouts that fit the GPUs
#   fidelity the fidelity tests against transformers on NCCL, the layouts that fit the GPUs
#   forward  grouped experts against SequentialMLP, and calibrating / quantizing mode against the plain forward
#            (bench_forward.py, one GPU): tiny-qwen3-moe and moe-1b at 4 x 512 tokens, the 30B shape at 2 x 2048
#   main     the main job on the built-in ~1.1B MoE (moe-1b, random weights, bf16) at TP2, at EP2 and at PP2 (and
#            TP2 x EP2 with 4 GPUs), each exported and verified; the exports compared (weight-derived tensors bitwise);
#            MAIN_SHORT=1: TP2 and EP2 only
#   hf       --hf-model on a bfloat16 Qwen3-MoE checkpoint made by transformers, EP over the GPUs, default dtype
#   faults   the same checkpoint with a NaN in an expert of the last rank: one line naming it, on NCCL
#   export   export GB/s of moe-1b on 1 and on all GPUs, rank 0 writing vs every rank writing (bench_export.py)
#   sync     one amax sync of 10,000 quantizers over NCCL (bench_sync.py)
#   kernels  the compiled kernels against the reference (test_kernels_cuda.py); NVFP4 fake quant vs copy bandwidth
#            and ModelOpt; MSE sweep vs reference, floor, ModelOpt
#   mx       the MXFP8 / MXFP4 / FP8-group kernels against the reference (test_mx_kernels_cuda.py), their speed
#            against a copy and ModelOpt's quantizers (bench_mx.py), and the MXFP8 main job on the 30B shape
#   fp8blocks the main job on the 30B shape in FP8 128x128 blocks (the engines' native fp8 checkpoint), verified
#   refit    real-quantized refits, buckets, recalibration and export of moe-1b and the 30B shape against their
#            ceilings in the same call (bench_refit.py, one GPU)
#   main1    the 30B-shaped main job on one GPU, 64 x 2048 tokens, batch 8 (calibrate + export + verify)
#   dsv3     the same on the DeepSeek-V3-shaped MoE (deepseek-v3-shape: MLA, 256 experts top-8, one dense and three
#            MoE layers, 37.0B; random weights drawn on the GPU): time per stage, tokens/s, peak memory; target:
#            within 10 minutes
#   big      a Qwen3-30B-A3B-shaped MoE (random weights drawn on the GPUs) at EP2 on 2 GPUs: 128 x 2048 tokens,
#            exported by both ranks and verified (time per stage, tokens/s, peak memory, export GB/s)
# Usage: benchmarks/run_gpu.sh [PART ...]  (default: all). A table of the steps, and the main-job summaries, are
# appended to $RESULTS (default benchmarks/RESULTS.md); everything printed goes to $LOGS/run_gpu.log.
# ModelOpt and megatron-core 0.19 come as wheels (benchmarks/fetch_wheels.sh) installed into PYTHONPATH first.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
LOGS=${LOGS:-/tmp/dist_quant_gpu}
WORK=${WORK:-/tmp/dist_quant_work}
PARTS=${*:-layout fidelity forward main hf faults export sync kernels mx fp8blocks refit main1 dsv3 big}
mkdir -p "$LOGS" "$WORK"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
GPUS=$(nvidia-smi -L | wc -l)
LOG="$LOGS/run_gpu.log"
TABLE="$LOGS/table.md"
printf '| step | exit | seconds |\n|---|---|---|\n' > "$TABLE"
status=0
want() { [[ " $PARTS " == *" $1 "* ]]; }
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
expect_error() {  # expect_error TEXT CMD...: CMD must fail with one `dist-quant: error:` line that holds TEXT
  local text=$1 out rc
  shift
  out=$("$@" 2>&1)
  rc=$?
  echo "$out"
  [ "$rc" -ne 0 ] && [ "$(grep -c '^dist-quant: error:' <<< "$out")" -eq 1 ] && grep -q "^dist-quant: error:.*$text" <<< "$out"
}
calibrate() {  # calibrate RANKS OUT ARGS...: the main job under torchrun, then inspect
  local ranks=$1 out=$2
  shift 2
  python3 -m torch.distributed.run --nproc-per-node "$ranks" -m dist_quant.cli calibrate --recipe nvfp4_default-fp8_cast_kv \
    --calib-samples 64 --seq-len 256 --out "$out" --overwrite "$@" && python3 -m dist_quant.cli inspect "$out"
}
nvidia-smi -L >> "$LOG" 2>&1
echo "===== $GPUS GPUs, parts: $PARTS" >> "$LOG"

nccl_tests() {  # nccl_tests FILE: a distributed test file on NCCL, one GPU per rank, the layouts that fit
  DIST_QUANT_TEST_BACKEND=nccl DIST_QUANT_TEST_MAX_RANKS=$GPUS python3 -m pytest -q -p no:cacheprovider "$1"
}
want layout && step nccl_layout_invariance nccl_tests tests/distributed/test_layout_invariance.py
want fidelity && step nccl_fidelity nccl_tests tests/fidelity/test_fidelity.py
want forward && step bench_forward python3 benchmarks/bench_forward.py --profile 30 --results "$RESULTS"
want forward && step bench_forward_30b python3 benchmarks/bench_forward.py --model qwen3-30b-a3b-shape --tokens 2x2048 --profile 20 \
  --reps 5 --results "$RESULTS"
if want main; then
  LAYOUTS=("tp2:--tp 2" "ep2:--ep 2")
  [ -z "${MAIN_SHORT:-}" ] && LAYOUTS+=("pp2:--pp 2")
  [ "$GPUS" -ge 4 ] && [ -z "${MAIN_SHORT:-}" ] && LAYOUTS+=("tp2xep2:--tp 2 --ep 2")
  for entry in "${LAYOUTS[@]}"; do
    name=${entry%%:*}
    ranks=2; [ "$name" = tp2xep2 ] && ranks=4
    # shellcheck disable=SC2086
    step "moe_1b_$name" calibrate "$ranks" "$WORK/moe-1b-$name" --model moe-1b ${entry#*:}
  done
  step compare_tp2_ep2 python3 benchmarks/compare_exports.py "$WORK/moe-1b-tp2" "$WORK/moe-1b-ep2"
  [ -z "${MAIN_SHORT:-}" ] && step compare_tp2_pp2 python3 benchmarks/compare_exports.py "$WORK/moe-1b-tp2" "$WORK/moe-1b-pp2"
  [ "$GPUS" -ge 4 ] && [ -z "${MAIN_SHORT:-}" ] && step compare_tp2_tp2xep2 python3 benchmarks/compare_exports.py "$WORK/moe-1b-tp2" "$WORK/moe-1b-tp2xep2"
fi
if want hf; then
  step hf_checkpoint python3 benchmarks/make_hf_checkpoint.py --out "$WORK/qwen3-moe-bf16" --dtype bfloat16
  step hf_qwen3_moe_bf16 calibrate "$GPUS" "$WORK/qwen3-moe-bf16-nvfp4" --hf-model "$WORK/qwen3-moe-bf16" --ep "$GPUS"
fi
if want faults; then
  bad="model.layers.0.mlp.experts.31.up_proj.weight"  # held by the last EP rank
  step faults_checkpoint python3 benchmarks/make_hf_checkpoint.py --out "$WORK/qwen3-moe-nan" --nan "$bad"
  step faults_nan_on_last_rank expect_error "rank $((GPUS - 1)): .*experts.31.up_proj.weight: NaN or Inf" \
    python3 -m torch.distributed.run --nproc-per-node "$GPUS" -m dist_quant.cli calibrate --hf-model "$WORK/qwen3-moe-nan" \
    --recipe nvfp4_default-fp8_cast_kv --ep "$GPUS" --out "$WORK/never-written"
fi
want export && step bench_export python3 benchmarks/bench_export.py --model moe-1b --ranks 1 "$GPUS" --results "$RESULTS"
want sync && step bench_sync python3 benchmarks/bench_sync.py --backend nccl --ranks "$GPUS" --peer-repeats 3 --results "$RESULTS"
if want kernels; then
  step kernels_cuda python3 -m pytest -q -p no:cacheprovider tests/unit/test_kernels_cuda.py
  step bench_numerics python3 benchmarks/bench_numerics.py --no-sweep --results "$RESULTS"
  step bench_mse python3 benchmarks/bench_mse.py --no-sweep --results "$RESULTS"
fi
if want mx; then
  step mx_kernels_cuda python3 -m pytest -q -p no:cacheprovider tests/unit/test_mx_kernels_cuda.py
  step bench_mx python3 benchmarks/bench_mx.py --results "$RESULTS"
  step qwen3_30b_a3b_shape_mxfp8_1gpu timeout 540 python3 -m dist_quant.cli calibrate --model qwen3-30b-a3b-shape \
    --random-weights --recipe mxfp8_default-fp8_cast_kv --calib-samples 64 --seq-len 2048 --batch-size 8 \
    --out "$WORK/qwen3-30b-a3b-shape-mxfp8" --overwrite
fi
if want fp8blocks; then
  step qwen3_30b_a3b_shape_fp8_blocks_1gpu timeout 540 python3 -m dist_quant.cli calibrate --model qwen3-30b-a3b-shape \
    --random-weights --recipe fp8_block_default-fp8_cast_kv --calib-samples 64 --seq-len 2048 --batch-size 8 \
    --out "$WORK/qwen3-30b-a3b-shape-fp8-blocks" --overwrite
fi
want refit && step bench_refit python3 benchmarks/bench_refit.py --out-dir "$WORK/bench_refit" --results "$RESULTS"
if want main1; then
  step qwen3_30b_a3b_shape_1gpu timeout 540 python3 -m dist_quant.cli calibrate --model qwen3-30b-a3b-shape --random-weights \
    --recipe nvfp4_default-fp8_cast_kv --calib-samples 64 --seq-len 2048 --batch-size 8 \
    --out "$WORK/qwen3-30b-a3b-shape-1gpu" --overwrite
fi
if want dsv3; then
  step deepseek_v3_shape_1gpu timeout 600 python3 -m dist_quant.cli calibrate --model deepseek-v3-shape --random-weights \
    --recipe nvfp4_default-fp8_cast_kv --calib-samples 64 --seq-len 2048 --batch-size 8 \
    --out "$WORK/deepseek-v3-shape-1gpu" --overwrite
fi
if want big; then
  step qwen3_30b_a3b_shape_ep2 timeout 420 python3 -m torch.distributed.run --nproc-per-node 2 -m dist_quant.cli calibrate \
    --model qwen3-30b-a3b-shape --random-weights --recipe nvfp4_default-fp8_cast_kv --ep 2 --calib-samples 128 \
    --seq-len 2048 --batch-size 8 --export-writers all --out "$WORK/qwen3-30b-a3b-shape-nvfp4" --overwrite
fi
{
  echo
  echo "## run_gpu.sh on $GPUS GPUs ($(date -u '+%Y-%m-%d %H:%M UTC')): $PARTS"
  echo
  echo "- GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
  echo "- command: \`benchmarks/run_gpu.sh $*\`"
  echo
  cat "$TABLE"
  echo
  echo '```'
  # the job summaries, the inspections, the export comparisons and the test tallies (tqdm's \r share lines)
  tr '\r' '\n' < "$LOG" | sed -n -e '/^dist-quant calibrate:/,/^  checkpoint:/p' -e '/: \(NVFP4\|FP8\|MIXED_PRECISION\) weights/,/verify:/p'
  tr '\r' '\n' < "$LOG" | sed -n '/ vs .*weight-derived tensors/,/identical\|differences/p'
  tr '\r' '\n' < "$LOG" | grep -E '^(=+ )?[0-9]+ (passed|failed)'
  tr '\r' '\n' < "$LOG" | grep -E '^dist-quant: error:'
  echo '```'
} >> "$RESULTS"
cat "$TABLE"
exit $status

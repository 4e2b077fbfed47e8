#!/usr/bin/env bash
# One command for a lent GPU: everything this toolkit does only on CUDA, checked and measured, in under 9 minutes
# on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                       # all stages; logs and summary.txt in $OUT (default gpu_check_out/)
#   STAGES="expert_lora syncs" bash benchmarks/gpu_check.sh    # a subset
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh    # the CPU smoke run (tests/test_gpu_check.py, slow tier)
#
# On an air-gapped node with an older image (torch 2.11, no trl / deepspeed / bitsandbytes): run
# benchmarks/gpu_wheels.sh where the registries are, carry .whl/, and this script installs from it first
# (pip --no-index --no-deps --target, nothing on the node changes). Stage 1 prints the versions really used.
#
# Stages, each time-boxed (seconds):
#   env 30          versions, the GPU, finetune.private_apis.problems()
#   gpu_tests 90    pytest -m gpu (our LM head = TRL's Triton head; offloaded activations = kept ones; 32k)
#   expert_lora 45  routed expert LoRA = PEFT's at Mixtral's layer shape: fp32 within 1e-5, bf16 within 2e-2
#   nf4 30          the 4-bit expert layer = its dequantized twin, forward and gradients
#   syncs 45        host syncs per non-logging optimizer step (torch.cuda.set_sync_debug_mode), by source line
#   sft_dpo 75      tiny SFT (packed, bf16), then DPO from it: the first dpo_loss is ln 2 within 2e-3
#   zero3 75        one-process ZeRO-3 over NCCL: the tiny SFT recipe under recipes/accelerate/zero3.yaml
#   moe_lora 60     benchmarks/moe_lora.py --shape mixtral --dtype bf16 --nf4
#   throughput 90   a 4-layer model at Mixtral's width: tokens/s, MFU, peak memory, projected to 8x7B
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
STAGES=${STAGES:-env gpu_tests expert_lora nf4 syncs sft_dpo zero3 moe_lora throughput}
PY=${PY:-python3}
export DEVICE SMALL="${SMALL:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
declare -A LIMIT=([env]=30 [gpu_tests]=90 [expert_lora]=45 [nf4]=30 [syncs]=45 [sft_dpo]=75 [zero3]=75 [moe_lora]=60
                  [throughput]=90)
if [[ -n "$SMALL" ]]; then for stage in "${!LIMIT[@]}"; do LIMIT[$stage]=600; done; fi
for stage in $STAGES; do
  [[ -n "${LIMIT[$stage]:-}" ]] || { echo "error: unknown stage '$stage' in STAGES (stages: ${!LIMIT[*]})" >&2; exit 2; }
done
mkdir -p "$OUT"
WORK=$(mktemp -d)
export WORK MIXTRAL_FINETUNE_CACHE="$WORK/data-cache"
trap 'rm -rf "$WORK"' EXIT

# The carried wheels, where this environment lacks what they bring (a full install here needs none of them).
if compgen -G ".whl/*.whl" >/dev/null && ! $PY -c "import trl, deepspeed, datasets, mistral_common" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    || { echo "error: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"


run_stage() {
  local stage=$1
  case $stage in
    gpu_tests) $PY -m pytest -q -p no:cacheprovider -m gpu tests ;;
    zero3)
      local config=recipes/accelerate/zero3.yaml
      [[ $DEVICE == cpu ]] && config=recipes/accelerate/cpu_zero3.yaml
      FINETUNE_LAUNCHED=1 $PY -m accelerate.commands.launch --config_file "$config" --num_processes 1 \
        -m finetune.sft recipes/tiny/sft.yaml "model=$WORK/tiny-mixtral" "output_dir=$WORK/zero3" resume=restart \
        "device=$DEVICE" train.max_steps=3 train.logging_steps=1 train.save_strategy=no train.eval_strategy=no \
        train.report_to=none "train.bf16=$([[ $DEVICE == cuda ]] && echo true || echo false)" &&
        echo "summary: ZeRO-3, one process over $([[ $DEVICE == cuda ]] && echo NCCL || echo gloo): 3 steps trained" ;;
    moe_lora)
      if [[ -n "$SMALL" ]]; then $PY benchmarks/moe_lora.py --shape small --rounds 2 --nf4
      else $PY benchmarks/moe_lora.py --shape mixtral --dtype bf16 --nf4; fi ;;
    *) $PY benchmarks/gpu_check.py "$stage" "$WORK" ;;
  esac
}

: > "$OUT/summary.txt"
failed=0
for stage in $STAGES; do
  [[ $stage == zero3 && ! -d "$WORK/tiny-mixtral" ]] && $PY -m finetune.tiny "$WORK/tiny-mixtral" >/dev/null
  start=$SECONDS
  timeout "${LIMIT[$stage]}" bash -c "$(declare -f run_stage); run_stage $stage" > "$OUT/$stage.log" 2>&1
  code=$?
  seconds=$((SECONDS - start))
  line=$(grep '^summary: ' "$OUT/$stage.log" | tail -1 | sed 's/^summary: //')
  if [[ $stage == gpu_tests ]]; then line=$(tail -1 "$OUT/$stage.log"); fi
  if [[ $stage == moe_lora ]]; then line=$(grep -E '^(ours / frozen|PEFT / ours|nf4 / ours) time' "$OUT/$stage.log" | tr -s ' ' | paste -sd ';'); fi
  if [[ $code == 124 ]]; then status="TIMEOUT after ${LIMIT[$stage]} s"; failed=1
  elif [[ $code != 0 && ! ( $stage == gpu_tests && $code == 5 ) ]]; then status="FAILED (exit $code)"; failed=1
  else status=ok; fi
  printf '%-12s %-22s %4d s  %s\n' "$stage" "$status" "$seconds" "$line" | tee -a "$OUT/summary.txt"
done
echo "logs: $OUT/"
exit $failed

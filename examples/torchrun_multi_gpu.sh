#!/usr/bin/env bash
# Fine-tune on several GPUs of one machine: one process per GPU, DistributedDataParallel.
#
#   examples/torchrun_multi_gpu.sh ./FLARE22 4            # HQ-SAM ViT-B, 4 GPUs
#   MODEL=unet examples/torchrun_multi_gpu.sh ./FLARE22 2 # U-Net baseline, 2 GPUs
#
# Settings by environment variable (defaults are the study's, as in docs/reproduce.md):
#   MODEL=hqsam|sam|unet|deeplab  EPOCHS=10  BATCH=8  WORKERS=4  DEVICE=auto|cuda|cpu  MAX_STEPS=  (cap per epoch)
#   CHECKPOINT=sam_hq_vit_b (sam: sam_vit_b)  ENCODER=resnet34  ENCODER_WEIGHTS=imagenet|none
#   OUT=runs/MODEL-ddp-DATE  PREPARED=prepared/NAME
#
# The command is exactly the single-GPU one behind torchrun. --batch-size is per
# process (the effective batch is NPROC times larger); only rank 0 writes the run
# folder and shows progress. An interrupted run continues with the same launcher
# and `--resume RUN_DIR` (same number of processes).
set -euo pipefail

DATA=${1:?usage: $0 DATA_DIR [NPROC]}
if [[ -n "${2:-}" ]]; then
  NPROC=$2
elif command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=$(nvidia-smi -L | wc -l)
else
  echo "$0: nvidia-smi not found: give the number of processes, e.g. $0 $DATA 2 (with DEVICE=cpu on a machine without GPUs)" >&2
  exit 2
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: the number of processes must be a positive integer, got '$NPROC'" >&2
  exit 2
fi
MODEL=${MODEL:-hqsam}
OUT=${OUT:-runs/${MODEL}-ddp-$(date +%Y%m%d-%H%M%S)}
PREPARED=${PREPARED:-prepared/$(basename "$DATA")}

case "$MODEL" in
  hqsam) MODEL_ARGS=(--checkpoint "${CHECKPOINT:-sam_hq_vit_b}") ;;
  sam) MODEL_ARGS=(--checkpoint "${CHECKPOINT:-sam_vit_b}") ;;
  unet|deeplab) MODEL_ARGS=(--encoder "${ENCODER:-resnet34}" --encoder-weights "${ENCODER_WEIGHTS:-imagenet}") ;;
  *) echo "$0: unknown MODEL=$MODEL (hqsam, sam, unet, deeplab)" >&2; exit 2 ;;
esac
EXTRA=()
if [[ -n "${MAX_STEPS:-}" ]]; then EXTRA+=(--max-steps "$MAX_STEPS"); fi

# Prepare up front (the trainer would otherwise prepare on rank 0 while the other processes wait).
flaresam prepare --data "$DATA" --out "$PREPARED"

exec torchrun --standalone --nproc_per_node "$NPROC" --no-python \
  flaresam finetune \
    --data "$PREPARED" \
    --model "$MODEL" "${MODEL_ARGS[@]}" \
    --epochs "${EPOCHS:-10}" --batch-size "${BATCH:-8}" \
    --workers "${WORKERS:-4}" --device "${DEVICE:-auto}" \
    "${EXTRA[@]}" \
    --out "$OUT"

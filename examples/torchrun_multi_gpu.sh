#!/usr/bin/env bash
# Fine-tune on several GPUs of one machine: one process per GPU, DistributedDataParallel.
#
#   examples/torchrun_multi_gpu.sh ./FLARE22 4            # HQ-SAM ViT-B, 4 GPUs
#   MODEL=unet examples/torchrun_multi_gpu.sh ./FLARE22 2 # U-Net baseline, 2 GPUs
#
# The command is exactly the single-GPU one behind torchrun. --batch-size is per
# process (the effective batch is NPROC times larger); only rank 0 writes the run
# folder and shows progress. An interrupted run continues with the same launcher
# and `--resume RUN_DIR` (same number of processes).
set -euo pipefail

DATA=${1:?usage: $0 DATA_DIR [NPROC]}
NPROC=${2:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MODEL=${MODEL:-hqsam}
OUT=${OUT:-runs/${MODEL}-ddp-$(date +%Y%m%d-%H%M%S)}

# Prepare up front (the trainer would otherwise prepare on rank 0 while the other processes wait).
flaresam prepare --data "$DATA" --out "${PREPARED:-prepared/$(basename "$DATA")}"

case "$MODEL" in
  hqsam|sam) MODEL_ARGS=(--checkpoint "${CHECKPOINT:-sam_hq_vit_b}") ;;
  unet|deeplab) MODEL_ARGS=(--encoder "${ENCODER:-resnet34}") ;;
  *) echo "unknown MODEL=$MODEL" >&2; exit 2 ;;
esac
if [[ "$MODEL" == sam && -z "${CHECKPOINT:-}" ]]; then MODEL_ARGS=(--checkpoint sam_vit_b); fi

exec torchrun --standalone --nproc_per_node "$NPROC" --no-python \
  flaresam finetune \
    --data "${PREPARED:-prepared/$(basename "$DATA")}" \
    --model "$MODEL" "${MODEL_ARGS[@]}" \
    --epochs "${EPOCHS:-20}" --batch-size "${BATCH:-8}" \
    --workers "${WORKERS:-4}" \
    --out "$OUT"

#!/usr/bin/env bash
# Multi-GPU / multi-node pretraining (and QAT) of a MOAI preset with torchrun.
#
#   ./pretrain.sh 2b                                   all local GPUs, DDP
#   ./pretrain.sh 8b                                   FSDP2 + activation checkpointing (default for 8b/16b)
#   USE_QUANTIZATION=true QUANT_BITS=4 ./pretrain.sh 2b    quantization-aware training, converted at the end
#   NPROC_PER_NODE=8 NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=29500 ./pretrain.sh 16b   (on each node)
#   ./pretrain.sh 2b --max_steps 20000 --save_every 500    extra flags go to `moai train`
#
# Environment (defaults in brackets):
#   DATA_DIR [data/packed]   shards from `moai tokenize`      OUTPUT_DIR [runs/<preset>[-qat<bits>]]
#   NPROC_PER_NODE [all local GPUs, 1 without]  NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]
#   MASTER_PORT [29500]
#   DISTRIBUTED [fsdp2 for 8b/16b, else auto = ddp]   GRADIENT_CHECKPOINTING [true for 8b/16b]
#   BATCH_SIZE [per GPU: 8; 8b 4; 16b 2]   GLOBAL_BATCH_SIZE [256 sequences]   MAX_LENGTH [2048]
#   MIXED_PRECISION [auto: bf16 on GPU]   PARAMS_FILE [none: a JSON of TrainParams, flags override it]
#   USE_QUANTIZATION [false]  QUANT_BITS [4]  QUANT_GROUP_SIZE [128]
#   PYTHON [python]   TORCHRUN [torchrun, else $PYTHON -m torch.distributed.run]   DRY_RUN [0: 1 prints, no launch]
#
# Before torchrun starts, `moai train --check_only` checks every input for the world size
# (NPROC_PER_NODE × NNODES): the global batch must divide into batch_size × world size, and a checkpoint
# in OUTPUT_DIR must be of the same preset and run. A bad input ends here with one line naming the
# parameter, before any GPU is held. Run the same command again to resume from the newest checkpoint
# (on any number of GPUs, as long as GLOBAL_BATCH_SIZE is unchanged).
set -euo pipefail

usage() { echo "usage: [ENV=...] $0 PRESET [moai train flags...]   (PRESET: tiny 130m 370m 1b 2b 8b 16b)" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
PRESET="$1"; shift
case "$PRESET" in
  tiny|130m|370m|1b|2b|8b|16b) ;;
  -h|--help) usage ;;
  *) echo "pretrain.sh: error: unknown preset '$PRESET'; choose one of tiny 130m 370m 1b 2b 8b 16b" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python}"
truthy() { case "${1,,}" in 1|true|yes|on) return 0 ;; *) return 1 ;; esac; }
is_big() { [[ "$PRESET" == 8b || "$PRESET" == 16b ]]; }

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NPROC_PER_NODE" -ge 1 ]] 2>/dev/null || NPROC_PER_NODE=1
fi
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
for v in NPROC_PER_NODE NNODES NODE_RANK MASTER_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "pretrain.sh: error: $v must be a non-negative integer, got '${!v}'" >&2; exit 2; }
done
[[ "$NPROC_PER_NODE" -ge 1 && "$NNODES" -ge 1 ]] || { echo "pretrain.sh: error: NPROC_PER_NODE and NNODES must be ≥ 1" >&2; exit 2; }
WORLD_SIZE_PLANNED=$(( NPROC_PER_NODE * NNODES ))

if is_big; then default_dist=fsdp2; default_ckpt=true; else default_dist=auto; default_ckpt=false; fi
case "$PRESET" in 8b) default_bs=4 ;; 16b) default_bs=2 ;; *) default_bs=8 ;; esac
DISTRIBUTED="${DISTRIBUTED:-$default_dist}"
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-$default_ckpt}"
BATCH_SIZE="${BATCH_SIZE:-$default_bs}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-256}"
MAX_LENGTH="${MAX_LENGTH:-2048}"
MIXED_PRECISION="${MIXED_PRECISION:-auto}"
DATA_DIR="${DATA_DIR:-data/packed}"

CONFIG="$PRESET"
[[ -f "configs/mamba_config_${PRESET}.json" ]] && CONFIG="configs/mamba_config_${PRESET}.json"

ARGS=(train --config "$CONFIG" --data_dir "$DATA_DIR" --distributed "$DISTRIBUTED"
      --batch_size "$BATCH_SIZE" --global_batch_size "$GLOBAL_BATCH_SIZE" --max_length "$MAX_LENGTH"
      --mixed_precision "$MIXED_PRECISION")
truthy "$GRADIENT_CHECKPOINTING" && ARGS+=(--gradient_checkpointing)
SUFFIX=""
if truthy "${USE_QUANTIZATION:-false}"; then
  QUANT_BITS="${QUANT_BITS:-4}"
  ARGS+=(--quantize --bits "$QUANT_BITS" --group_size "${QUANT_GROUP_SIZE:-128}")
  SUFFIX="-qat${QUANT_BITS}"
fi
OUTPUT_DIR="${OUTPUT_DIR:-runs/${PRESET}${SUFFIX}}"
ARGS+=(--output_dir "$OUTPUT_DIR")
[[ -n "${PARAMS_FILE:-}" ]] && ARGS+=(--params "$PARAMS_FILE")
ARGS+=("$@")

if [[ -n "${TORCHRUN:-}" ]]; then read -r -a LAUNCH <<< "$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then LAUNCH=(torchrun)
else LAUNCH=("$PYTHON" -m torch.distributed.run); fi
LAUNCH+=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m moai_lib.cli "${ARGS[@]}")

# Fail here, with one line naming the parameter, rather than after every node has rendezvoused.
"$PYTHON" -m moai_lib.cli "${ARGS[@]}" --check_only --world_size "$WORLD_SIZE_PLANNED"

echo "pretrain.sh: $PRESET on $NNODES node(s) × $NPROC_PER_NODE process(es), distributed=$DISTRIBUTED" >&2
if truthy "${DRY_RUN:-0}"; then
  printf '%q ' "${LAUNCH[@]}"; echo
  exit 0
fi
exec "${LAUNCH[@]}"

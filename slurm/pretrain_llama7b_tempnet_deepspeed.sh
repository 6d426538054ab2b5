#!/bin/bash
# LLaMA-2 7B + TempNet/DRO loss with DeepSpeed ZeRO-1 instead of megatron-core's distributed
# optimizer, 4 nodes x 8 H100 (same layout as pretrain_llama7b_tempnet.sh: TP=2, DP=16).
#   DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/data/llama2.model \
#   CHECKPOINT_DIR=/ckpt/llama7b-tempnet-ds sbatch slurm/pretrain_llama7b_tempnet_deepspeed.sh
# Checkpoints are DeepSpeed's own (engine.save_checkpoint: CHECKPOINT_DIR/iter_*/ with ZeRO's
# optimizer partitions) under the same latest_checkpointed_iteration.txt marker, so preemption,
# requeue and resume work as in the other scripts. A resume keeps the tensor- and data-parallel
# sizes (ZeRO's partitions are per rank): the same nodes and GPUs per node. Only --deepspeed
# runs load these checkpoints (and only runs without it load megatron-core's).
# DeepSpeed reads the torchrun environment (RANK, WORLD_SIZE, ...), so the launcher is the same;
# DEEPSPEED_CONFIG picks the ZeRO stage (configs/deepspeed/zero1.json, zero2.json, ...).
#SBATCH --job-name=llama7b-tempnet-ds
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Your site's account and partition: drop one '#' (or pass sbatch -A ... -p ...).
##SBATCH --account=<account>
##SBATCH --partition=<partition>
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to the dataset prefix(es), e.g. /data/corpus_text_document}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the LLaMA SentencePiece tokenizer.model}"
: "${CHECKPOINT_DIR:?set CHECKPOINT_DIR to the checkpoint directory (saved to, resumed from)}"
RUN_CONFIG=${RUN_CONFIG:-configs/runs/llama2-7b-tempnet.yaml}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-configs/deepspeed/zero1.json}
# The 7B run config turns on megatron-core's sequence parallelism, which the DeepSpeed engine
# path does not run (its gradient reduction skips the norms' tensor-parallel sum): off here.
EXTRA_ARGS=(--deepspeed --deepspeed_config "$DEEPSPEED_CONFIG" --sequence-parallel false)
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh" \
  || { echo "submit from the repository root or set REPO_DIR" >&2; exit 2; }
launch "$@"

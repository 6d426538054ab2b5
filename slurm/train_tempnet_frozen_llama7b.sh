#!/bin/bash
# TempNet only, on a pretrained LLaMA-2 7B (LM frozen) on 1 node x 8 H100 (TP=1, DP=8).
# Convert the Hugging Face weights first (tools/convert_hf_to_checkpoint.py), then
#   PRETRAINED_CHECKPOINT=/ckpt/llama2-7b-converted DATA_PATH=/data/corpus_text_document \
#   TOKENIZER_MODEL=/data/llama2.model CHECKPOINT_DIR=/ckpt/llama7b-tempnet-frozen \
#   sbatch slurm/train_tempnet_frozen_llama7b.sh [trainer flags]
# The first attempt loads PRETRAINED_CHECKPOINT with --finetune (weights only, iteration 0);
# later attempts resume from CHECKPOINT_DIR. Layout and memory: docs/parallel_layouts.md.
#SBATCH --job-name=tempnet-frozen-llama7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Your site's account and partition: drop one '#' (or pass sbatch -A ... -p ...).
##SBATCH --account=<account>
##SBATCH --partition=<partition>
set -euo pipefail

: "${PRETRAINED_CHECKPOINT:?set PRETRAINED_CHECKPOINT to the converted LLaMA-2 7B checkpoint}"
: "${DATA_PATH:?set DATA_PATH to the dataset prefix(es), e.g. /data/corpus_text_document}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the LLaMA SentencePiece tokenizer.model}"
: "${CHECKPOINT_DIR:?set CHECKPOINT_DIR to the checkpoint directory (saved to, resumed from)}"
RUN_CONFIG=${RUN_CONFIG:-configs/runs/llama2-7b-tempnet-frozen.yaml}
FINETUNE_FROM=$PRETRAINED_CHECKPOINT
SAVE_INTERVAL=${SAVE_INTERVAL:-500}

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh" \
  || { echo "submit from the repository root or set REPO_DIR" >&2; exit 2; }
launch "$@"

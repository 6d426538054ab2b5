#!/bin/bash
# GPT-2 small (124M) + TempNet/DRO loss from scratch on 1 node x 8 H100 (DP=8, seq 1024).
#   DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/data/gpt2-tokenizer.json \
#   CHECKPOINT_DIR=/ckpt/gpt2-125m-tempnet sbatch slurm/pretrain_gpt2_125m_tempnet.sh [flags]
# Submit from the repository root (or set REPO_DIR). Without SLURM it runs locally under
# torchrun; --dry-run prints the command. Layout and memory: docs/parallel_layouts.md.
#SBATCH --job-name=gpt2-125m-tempnet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Your site's account and partition: drop one '#' (or pass sbatch -A ... -p ...).
##SBATCH --account=<account>
##SBATCH --partition=<partition>
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to the dataset prefix(es), e.g. /data/corpus_text_document}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the GPT-2 tokenizers JSON (tokenizer.json)}"
: "${CHECKPOINT_DIR:?set CHECKPOINT_DIR to the checkpoint directory (saved to, resumed from)}"
RUN_CONFIG=${RUN_CONFIG:-configs/runs/gpt2-125m-tempnet.yaml}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh" \
  || { echo "submit from the repository root or set REPO_DIR" >&2; exit 2; }
launch "$@"

# shellcheck shell=bash
# Shared launcher of the slurm/*.sh scripts: sourced by them, never run on its own.
#
# A script sets a few variables, then calls `launch "$@"`:
#   RUN_CONFIG       run YAML (configs/runs/*.yaml): model preset, parallel layout, train, tempnet
#   DATA_PATH        dataset prefix(es), word-split: "data/corpus_text_document" or
#                    "0.7 data/a_text_document 0.3 data/b_text_document" (weighted blend)
#   TOKENIZER_MODEL  SentencePiece .model (LLaMA) or tokenizers JSON (GPT-2)
#   CHECKPOINT_DIR   where checkpoints are saved and resumed from ("none": no checkpointing,
#                    for smoke tests only)
#   FINETUNE_FROM    optional: a checkpoint to start from with --finetune (weights only) when
#                    CHECKPOINT_DIR holds no checkpoint yet
#   EXTRA_ARGS       optional array: more trainer flags from the script (e.g. DeepSpeed's)
# and `launch` adds, in this order: --config RUN_CONFIG, data and tokenizer, checkpointing
# (--save, --save-interval, --load when resuming), EXTRA_ARGS, then the script's own arguments
# (`sbatch slurm/x.sh --train-iters 100`: the last flag wins).
#
# Modes
#   SLURM (SLURM_JOB_ID set): one `srun` task per node runs torchrun with NPROC (= GPUs per
#     node) workers and a c10d rendezvous on the first node of the allocation.
#   local (no SLURM_JOB_ID): one torchrun on this machine, 1 node, NPROC workers (default: the
#     number of GPUs, or 2 on a CPU-only machine; gloo then). For smoke tests.
#   --dry-run or DRY_RUN=1: print the resolved environment and command, run nothing.
#
# Preemption and time limits (the choice, and why)
#   The scripts ask for `#SBATCH --signal=B:USR1@<seconds>`: SLURM signals the BATCH SHELL only,
#   <seconds> before the time limit. Not `--signal=USR1@...` (to the job steps): that would hit
#   torchrun itself, and torchrun (before torch's --signals-to-handle) dies on SIGUSR1 without
#   telling its workers. Here the batch shell traps USR1 (and TERM, sent on preemption or
#   scancel) and forwards SIGUSR1 to the job steps with `scancel --signal=USR1 $SLURM_JOB_ID`
#   (steps only, not the batch shell). torchrun runs with
#   --signals-to-handle ...,SIGUSR1 and passes the signal to every worker, then waits up to
#   SHUTDOWN_TIMEOUT seconds for them; the trainer saves a checkpoint and exits with
#   EXIT_CODE_PREEMPTED. The batch shell then requeues the job (`scontrol requeue`); the new
#   attempt finds CHECKPOINT_DIR/latest_checkpointed_iteration.txt and passes --load.
#   torchrun reports any worker failure as exit code 1, so the workers' own exit code is read
#   from CHECKPOINT_DIR/exit_status.json (the trainer writes it), else from torchrun's failure
#   report in the attempt's log ("exitcode  : 3"): a trainer that exits
#   with EXIT_CODE_PREEMPTED or EXIT_CODE_TIME_LIMIT on its own (a signal sent to it directly,
#   --exit-duration-in-mins via EXIT_DURATION_MINS) is requeued as well. Any other failure
#   (EXIT_CODE_DIVERGED included) is not. Make <seconds> larger than a checkpoint save (see docs/parallel_layouts.md).
#   Without SLURM, the run exits with EXIT_CODE_PREEMPTED and the same command resumes it.

# The trainer's exit codes after saving a checkpoint (megatron_tempnet/training/run_control.py;
# tests/unit/test_slurm.py keeps them equal): both mean "requeue me".
EXIT_CODE_PREEMPTED=3   # SIGTERM / SIGUSR1 received
EXIT_CODE_TIME_LIMIT=4  # --exit-duration-in-mins reached
: "${REPO_DIR:?REPO_DIR must be set (the repository root) before sourcing slurm/common.sh}"

_log() { printf '[launch] %s\n' "$*" >&2; }
_die() { printf '[launch] error: %s\n' "$*" >&2; exit 2; }

# Print a command as one shell-quoted line (what --dry-run shows, and the log's first line).
_quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg"); else out+=("$(printf '%q' "$arg")"); fi
  done
  printf '%s\n' "${out[*]}"
}

# Number of GPUs on this machine (0 without nvidia-smi).
_local_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Environment for NCCL and megatron-core. Only defaults: anything already set wins.
_export_env() {
  # megatron-core overlaps tensor-parallel communication with compute (and sequence
  # parallelism relies on it) only when kernels are issued in order on one connection.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # A NCCL error or timeout tears the job down (so SLURM can requeue it) instead of hanging.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # name before torch 2.2
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}  # less memory
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # InfiniBand / RoCE: set for your fabric (ask your admins; `ibv_devinfo` lists the HCAs).
  #   export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
  #   export NCCL_SOCKET_IFNAME=eth0     # interface for NCCL's bootstrap and the rendezvous
  #   export NCCL_IB_GID_INDEX=3         # RoCE only
  #   export NCCL_IB_TIMEOUT=22          # larger on big or busy fabrics
  #   export NCCL_NET_GDR_LEVEL=PHB      # GPUDirect RDMA, if the topology allows it
  export PYTHONUNBUFFERED=1
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" && -z "${OMP_NUM_THREADS:-}" ]]; then
    export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / NPROC > 0 ? SLURM_CPUS_PER_TASK / NPROC : 1 ))
  fi
}

# Resolve mode, topology and rendezvous into NNODES, NPROC, MASTER_ADDR, MASTER_PORT, RDZV_ID.
_resolve_topology() {
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    MODE=slurm
    NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES is not set}}
    local gpus=${SLURM_GPUS_PER_NODE:-8}
    NPROC=${NPROC:-${GPUS_PER_NODE:-${gpus##*:}}}  # "h100:8" -> 8
    command -v scontrol >/dev/null 2>&1 || _die "scontrol not found on PATH (needed for the node list)"
    if [[ -z "${MASTER_ADDR:-}" ]]; then  # first host (no `| head`: SIGPIPE under pipefail)
      local hosts
      hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || _die "scontrol show hostnames failed"
      MASTER_ADDR=${hosts%%$'\n'*}
    fi
    [[ -n "$MASTER_ADDR" ]] || _die "no host in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}  # per job: jobs may share a node
    RDZV_ID=$SLURM_JOB_ID
    LOG_DIR=${LOG_DIR:-$LOG_ROOT/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID}
  else
    MODE=local
    NNODES=1
    if [[ -z "${NPROC:-}" ]]; then
      NPROC=$(_local_gpus)
      (( NPROC > 0 )) || NPROC=2
    fi
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MASTER_PORT=${MASTER_PORT:-29500}
    RDZV_ID=local-$$
    LOG_DIR=${LOG_DIR:-$LOG_ROOT/local-$(date +%Y%m%d-%H%M%S)-$$}
  fi
}

# Trainer arguments: config, data, checkpointing (resume or finetune), extras, user flags.
_trainer_args() {
  local -a data_words
  read -r -a data_words <<< "$DATA_PATH"
  TRAIN_ARGS=(-m megatron_tempnet.train --config "$RUN_CONFIG"
              --data-path "${data_words[@]}" --tokenizer-model "$TOKENIZER_MODEL")
  RESUME="no checkpointing (CHECKPOINT_DIR=none)"
  if [[ "$CHECKPOINT_DIR" != none ]]; then
    RESUME="fresh start (no checkpoint in $CHECKPOINT_DIR yet)"
    TRAIN_ARGS+=(--save "$CHECKPOINT_DIR" --save-interval "${SAVE_INTERVAL:-1000}")
    if [[ -n "${KEEP_LAST:-}" ]]; then TRAIN_ARGS+=(--keep-last "$KEEP_LAST"); fi
    if [[ -n "${EXIT_DURATION_MINS:-}" ]]; then
      TRAIN_ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS")
    fi
    if [[ -f "$CHECKPOINT_DIR/latest_checkpointed_iteration.txt" ]]; then
      RESUME="resume from $CHECKPOINT_DIR (iteration $(<"$CHECKPOINT_DIR/latest_checkpointed_iteration.txt"))"
      TRAIN_ARGS+=(--load "$CHECKPOINT_DIR")
    elif [[ -n "${FINETUNE_FROM:-}" ]]; then
      RESUME="finetune from $FINETUNE_FROM (weights only, iteration 0)"
      TRAIN_ARGS+=(--load "$FINETUNE_FROM" --finetune)
    fi
  fi
  TRAIN_ARGS+=("${EXTRA_ARGS[@]}" "${USER_ARGS[@]}")
}

# The full command: [srun ...] python -m torch.distributed.run <rendezvous> <trainer args>.
_launch_command() {
  local -a torchrun=("$PYTHON" -m torch.distributed.run
    --nnodes "$NNODES" --nproc_per_node "$NPROC"
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID"
    --max_restarts 0
    --signals_to_handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    --shutdown_timeout "${SHUTDOWN_TIMEOUT:-600}")
  if [[ "$MODE" == slurm ]]; then
    # one task per node (torchrun starts the GPU workers); all CPUs of the node to it
    LAUNCH_CMD=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1
                --kill-on-bad-exit=1 --cpu-bind=none "${torchrun[@]}" "${TRAIN_ARGS[@]}")
  else
    LAUNCH_CMD=("${torchrun[@]}" "${TRAIN_ARGS[@]}")
  fi
}

# Forward a preemption/time-limit signal to the trainer (see "Preemption" above).
_on_signal() {
  PREEMPTED_BY=$1
  _log "got SIG$1: asking the trainer to save a checkpoint and exit"
  if [[ "$MODE" == slurm ]]; then
    scancel --signal=USR1 "$SLURM_JOB_ID" || _log "scancel --signal=USR1 failed"
  elif [[ -n "${CHILD_PID:-}" ]]; then
    kill -s USR1 "$CHILD_PID" 2>/dev/null || true
  fi
}

# The trainer's exit code from CHECKPOINT_DIR/exit_status.json (written atomically by rank 0),
# if this attempt wrote it (modified at or after epoch seconds $1); empty otherwise.
_trainer_exit_code() {
  local f="$CHECKPOINT_DIR/exit_status.json"
  [[ "$CHECKPOINT_DIR" != none && -f "$f" ]] || return 0
  (( $(stat -c %Y "$f") >= $1 )) || return 0
  sed -n 's/.*"exit_code": \([0-9][0-9]*\).*/\1/p' "$f" | head -1
}

# wait for a background child, again after each trapped signal; return its exit status.
_wait_child() {
  local rc
  while true; do
    rc=0
    wait "$1" || rc=$?
    if (( rc > 128 )) && kill -0 "$1" 2>/dev/null; then
      continue  # interrupted by a trapped signal: the child still runs (saving)
    fi
    return "$rc"
  done
}

launch() {
  local dry_run=${DRY_RUN:-0}
  USER_ARGS=()
  local arg
  for arg in "$@"; do
    if [[ "$arg" == --dry-run ]]; then dry_run=1; else USER_ARGS+=("$arg"); fi
  done
  [[ -n "${RUN_CONFIG:-}" ]] || _die "RUN_CONFIG is not set (a configs/runs/*.yaml)"
  : "${DATA_PATH:?set DATA_PATH to the dataset prefix(es), e.g. /data/corpus_text_document}"
  : "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer file (.model or tokenizers .json)}"
  : "${CHECKPOINT_DIR:?set CHECKPOINT_DIR to the checkpoint directory (none: no checkpoints)}"
  cd "$REPO_DIR" || _die "cannot cd to REPO_DIR=$REPO_DIR"
  [[ -f "$RUN_CONFIG" ]] || _die "RUN_CONFIG=$RUN_CONFIG does not exist (relative to $REPO_DIR)"
  if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
  fi
  LOG_ROOT=${LOG_ROOT:-$REPO_DIR/logs}
  EXTRA_ARGS=("${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")
  _resolve_topology
  _trainer_args
  _launch_command
  local log="$LOG_DIR/attempt-${SLURM_RESTART_COUNT:-0}.log"

  if [[ "$dry_run" == 1 ]]; then
    _log "dry run: mode=$MODE nnodes=$NNODES nproc_per_node=$NPROC world_size=$(( NNODES * NPROC ))"
    _log "rendezvous: c10d $MASTER_ADDR:$MASTER_PORT id $RDZV_ID"
    _log "checkpoint: $RESUME; log: $log"
    ( _export_env; env | grep -E '^(CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_[A-Z_]*|NCCL_[A-Z_]*|OMP_NUM_THREADS)=' \
        | sort | sed 's/^/export /' )
    _quote "${LAUNCH_CMD[@]}"
    return 0
  fi

  if [[ -n "${DEEPSPEED_CONFIG:-}" && ! -f "$DEEPSPEED_CONFIG" ]]; then
    _die "DEEPSPEED_CONFIG=$DEEPSPEED_CONFIG does not exist (relative to $REPO_DIR)"
  fi
  _export_env
  mkdir -p "$LOG_DIR"
  [[ "$CHECKPOINT_DIR" == none ]] || mkdir -p "$CHECKPOINT_DIR"
  _log "mode=$MODE nnodes=$NNODES nproc_per_node=$NPROC rendezvous $MASTER_ADDR:$MASTER_PORT; checkpoint: $RESUME"
  _log "log: $log"
  _quote "${LAUNCH_CMD[@]}" >> "$log"

  PREEMPTED_BY=""
  local started
  started=$(date +%s)
  trap '_on_signal USR1' USR1
  trap '_on_signal TERM' TERM
  "${LAUNCH_CMD[@]}" > >(tee -a "$log") 2>&1 &
  CHILD_PID=$!
  local rc=0
  _wait_child "$CHILD_PID" || rc=$?
  trap - USR1 TERM
  sleep 0.2  # let tee drain the last lines

  local preempted=0
  local codes="($EXIT_CODE_PREEMPTED|$EXIT_CODE_TIME_LIMIT)"
  local trainer_rc
  trainer_rc=$(_trainer_exit_code "$started")
  if [[ -n "$trainer_rc" && "$trainer_rc" != 0 ]] && (( rc != 0 )); then
    rc=$trainer_rc  # the trainer's own code (torchrun reports every failure as 1)
  fi
  if [[ -n "$PREEMPTED_BY" ]] || (( rc == EXIT_CODE_PREEMPTED || rc == EXIT_CODE_TIME_LIMIT )) \
      || grep -Eq "exitcode +: +$codes( |$)" "$log" 2>/dev/null; then
    preempted=1
  fi
  if (( preempted )); then
    if [[ "$MODE" == slurm ]]; then
      if (( ${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-50} )); then
        _log "preempted, but requeued ${SLURM_RESTART_COUNT:-0} times already (MAX_REQUEUES): not again"
        return "$EXIT_CODE_PREEMPTED"
      fi
      _log "stopped with a checkpoint (${PREEMPTED_BY:+SIG}${PREEMPTED_BY:-trainer exit code}): requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID"
      return 0
    fi
    _log "preempted: checkpoint in $CHECKPOINT_DIR; run the same command again to resume"
    return "$EXIT_CODE_PREEMPTED"
  fi
  if (( rc == 0 )); then _log "finished"; else _log "trainer failed with exit code $rc (log: $log)"; fi
  return "$rc"
}

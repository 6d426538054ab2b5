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
# The other settings (environment; README "SLURM" has the table): LOG_ROOT, LOG_DIR, NPROC,
# GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, SAVE_INTERVAL, KEEP_LAST, EXIT_DURATION_MINS,
# MAX_REQUEUES, SHUTDOWN_TIMEOUT, PYTHON, SRUN_EXTRA_ARGS, TORCHRUN_EXTRA_ARGS, DRY_RUN,
# LAYOUT_CHECK.
#
# Modes
#   SLURM (SLURM_JOB_ID set): one `srun` task per node runs torchrun with NPROC workers (the
#     node's GPUs: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else SLURM_JOB_GPUS, else
#     SLURM_GPUS_PER_NODE / the gres string, else nvidia-smi; no GPU: CPU mode, gloo, NPROC
#     default 2) and a c10d rendezvous on the first node of the allocation.
#   local (no SLURM_JOB_ID): one torchrun on this machine, 1 node, NPROC workers (default: the
#     number of GPUs, or 2 on a CPU-only machine; gloo then), a free port. For smoke tests.
#   --dry-run or DRY_RUN=1: print the resolved environment, the TP/PP/DP layout (checked by the
#     trainer's own parser for this world size: a layout it refuses is an error, exit 2) and
#     the command; run nothing.
#   Job arrays: ${SLURM_ARRAY_TASK_ID} (or %a) written literally in CHECKPOINT_DIR, LOG_DIR,
#     RUN_CONFIG, FINETUNE_FROM, or a trainer flag is replaced by the array task's index.
#
# Logs: LOG_DIR/attempt-<SLURM_RESTART_COUNT>.log holds the launcher's lines (git commit
# included), the command and all output; srun writes it directly (no `tee` that a SIGTERM to
# the batch step could kill), and a `tail` that ignores SIGTERM copies it to the job's output.
# Each worker's stderr is also in LOG_DIR/ranks-<attempt>/ (torchrun --tee), and on the
# console with a [default<local rank>] prefix.
#
# Stopping (the choice, and why)
#   The scripts ask for `#SBATCH --signal=B:USR1@<seconds>`: SLURM signals the BATCH SHELL only,
#   <seconds> before the time limit. Not `--signal=USR1@...` (to the job steps): that would hit
#   torchrun itself, and torchrun (before torch's --signals-to-handle) dies on SIGUSR1 without
#   telling its workers. torchrun runs with --signals-to-handle ...,SIGUSR1 and passes a signal
#   to every worker, then waits up to SHUTDOWN_TIMEOUT seconds for them; the trainer saves a
#   checkpoint and exits with EXIT_CODE_PREEMPTED (SIGTERM or SIGUSR1) or EXIT_CODE_TIME_LIMIT
#   (--exit-duration-in-mins), and writes CHECKPOINT_DIR/exit_status.json. The launcher reads
#   the code from that record when it is this attempt's (its slurm_job_id is this job and its
#   time is not before this attempt started; a stale or "running" record is ignored), else
#   from torchrun's failure report in the attempt's log ("exitcode  : 3"), else srun's status.
#   What reaches the batch shell decides the rest:
#   - SIGUSR1 (the time-limit signal, or `scancel --batch --signal=USR1 JOB`): forwarded once
#     to the job steps (`scancel --signal=USR1 JOB`: steps only, never again after it was
#     delivered); the trainer saves; the batch shell requeues (`scontrol requeue`).
#   - SIGTERM: SLURM sends it to every step and the batch shell on a plain `scancel`, on
#     preemption without GraceTime, on `scontrol requeue` and at the hard time limit; the
#     trainer gets it too and saves (within KillWait). The trap asks `scontrol show job`:
#       Restarts above this attempt's SLURM_RESTART_COUNT: SLURM itself requeues the job
#         (preemption with PreemptMode=REQUEUE, `scontrol requeue`): nothing more to do;
#       PreemptTime set: preempted (GraceTime ended): requeue;
#       Reason=TimeLimit: the hard time limit: requeue;
#       otherwise (JobState CANCELLED/COMPLETING, or scontrol failed): a user's scancel: the
#         job stops, NOT requeued (sbatch the script again to resume).
#   - nothing (preemption with GraceTime signals the steps only; the trainer's own
#     --exit-duration-in-mins; `scancel --signal=TERM|USR1 JOB` to the steps): the trainer's
#     exit code decides: EXIT_CODE_PREEMPTED or EXIT_CODE_TIME_LIMIT is requeued.
#   Any other failure (EXIT_CODE_DIVERGED, a bad input) is not requeued, nor a run that
#   finished. MAX_REQUEUES bounds the requeues. Make <seconds> larger than a checkpoint save
#   (docs/parallel_layouts.md). Without SLURM, SIGUSR1 or SIGTERM to the launcher asks the
#   trainer to save; it exits with EXIT_CODE_PREEMPTED and the same command resumes it.

# The trainer's exit codes after saving a checkpoint (megatron_tempnet/training/run_control.py;
# tests/unit/test_slurm.py keeps them equal): both mean "requeue me".
EXIT_CODE_PREEMPTED=3   # SIGTERM / SIGUSR1 received
EXIT_CODE_TIME_LIMIT=4  # --exit-duration-in-mins reached
: "${REPO_DIR:?REPO_DIR must be set (the repository root) before sourcing slurm/common.sh}"

ATTEMPT_LOG=""  # set once the attempt's log exists: _log writes there too
TAILING=0       # 1 while `tail` copies the attempt's log to stdout (then _log writes only there)
_log() {
  local line
  line="[launch] $*"
  if [[ -n "$ATTEMPT_LOG" ]]; then printf '%s\n' "$line" >> "$ATTEMPT_LOG" 2>/dev/null || true; fi
  if [[ "$TAILING" != 1 || -z "$ATTEMPT_LOG" ]]; then printf '%s\n' "$line" >&2 || true; fi
}
_die() { ATTEMPT_LOG="" TAILING=0 _log "error: $*"; exit 2; }

# Print a command as one shell-quoted line (what --dry-run shows, and the log's first line).
_quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg")
    else out+=("$(printf '%q' "$arg")"); fi
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

# Entries of a device list: "0,1,2,3" -> 4, "" / "NoDevFiles" / "none" -> 0.
_count_devices() {
  local list=$1
  if [[ -z "$list" || ! "$list" =~ ^[0-9A-Za-z,:-]+$ || "$list" == NoDevFiles \
        || "$list" == none ]]; then
    echo 0
    return
  fi
  local -a items
  IFS=, read -r -a items <<< "$list"
  echo "${#items[@]}"
}

# GPUs of a count or gres string: "8", "h100:8", "gpu:4", "gres/gpu:h100:4",
# "gres:gpu:a100:2,gres:nic:1", "none" -> the count (0 for none); empty when unreadable.
_gres_gpus() {
  local s=$1 part
  [[ "$s" == none || "$s" == 0 ]] && { echo 0; return; }
  if [[ "$s" =~ ^([A-Za-z0-9_.-]+:)?([0-9]+)$ ]]; then echo "${BASH_REMATCH[2]}"; return; fi
  local -a parts
  IFS=, read -r -a parts <<< "$s"
  for part in "${parts[@]}"; do
    part=${part#gres/}; part=${part#gres:}
    if [[ "$part" =~ ^gpu(:[A-Za-z0-9_.-]+)?:([0-9]+) ]]; then echo "${BASH_REMATCH[2]}"; return; fi
  done
}

# GPUS (count) and GPU_SOURCE (where from) of this node of the allocation.
_slurm_gpus() {
  local n
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    GPUS=$(_gres_gpus "$GPUS_PER_NODE"); GPU_SOURCE="GPUS_PER_NODE=$GPUS_PER_NODE"
    [[ -n "$GPUS" ]] || _die "GPUS_PER_NODE=$GPUS_PER_NODE is not a number of GPUs"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    GPUS=$SLURM_GPUS_ON_NODE; GPU_SOURCE="SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    GPUS=$(_count_devices "$CUDA_VISIBLE_DEVICES"); GPU_SOURCE="CUDA_VISIBLE_DEVICES"
  elif [[ -n "${SLURM_JOB_GPUS:-}" ]]; then
    GPUS=$(_count_devices "$SLURM_JOB_GPUS"); GPU_SOURCE="SLURM_JOB_GPUS"
  elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]] && n=$(_gres_gpus "$SLURM_GPUS_PER_NODE") \
      && [[ -n "$n" ]]; then
    GPUS=$n; GPU_SOURCE="SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE"
  elif n=$(_gres_gpus "${SLURM_TRES_PER_NODE:-${SLURM_GRES:-}}") && [[ -n "$n" ]]; then
    GPUS=$n; GPU_SOURCE="gres ${SLURM_TRES_PER_NODE:-${SLURM_GRES:-}}"
  else
    GPUS=$(_local_gpus); GPU_SOURCE="nvidia-smi"
  fi
  [[ "$GPUS" =~ ^[0-9]+$ ]] || GPUS=0
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

# A free TCP port on this machine (local mode's rendezvous).
_free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null || echo 29500
}

# The first node's address: its hostname when it resolves, else SLURM's NodeAddr for it.
_first_node_addr() {
  local hosts first addr
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || _die "scontrol show hostnames failed"
  first=${hosts%%$'\n'*}  # (no `| head`: SIGPIPE under pipefail)
  if [[ -n "$first" ]] && ! getent hosts "$first" >/dev/null 2>&1; then
    addr=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' || true)
    addr=${addr#NodeAddr=}
    [[ -n "$addr" ]] && first=$addr
  fi
  printf '%s\n' "$first"
}

# ${SLURM_ARRAY_TASK_ID}, $SLURM_ARRAY_TASK_ID or %a (the job array's task index) written
# literally in a setting: replaced by this array task's index; an error outside an array.
# shellcheck disable=SC2016  # the placeholders are literal on purpose
_array_expand() {
  local value=$1 name=$2
  if [[ "$value" == *'${SLURM_ARRAY_TASK_ID}'* || "$value" == *'$SLURM_ARRAY_TASK_ID'* \
        || "$value" == *%a* ]]; then
    [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] || _die "$name=$value names the job array's task" \
      "index, but this is no array task: submit with sbatch --array=0-N" \
      "(or set SLURM_ARRAY_TASK_ID)"
    value=${value//'${SLURM_ARRAY_TASK_ID}'/$SLURM_ARRAY_TASK_ID}
    value=${value//'$SLURM_ARRAY_TASK_ID'/$SLURM_ARRAY_TASK_ID}
    value=${value//%a/$SLURM_ARRAY_TASK_ID}
  fi
  printf '%s' "$value"
}

# shellcheck disable=SC2016
_expand_array_settings() {
  CHECKPOINT_DIR=$(_array_expand "$CHECKPOINT_DIR" CHECKPOINT_DIR) || exit 2
  RUN_CONFIG=$(_array_expand "$RUN_CONFIG" RUN_CONFIG) || exit 2
  if [[ -n "${LOG_DIR:-}" ]]; then LOG_DIR=$(_array_expand "$LOG_DIR" LOG_DIR) || exit 2; fi
  if [[ -n "${FINETUNE_FROM:-}" ]]; then
    FINETUNE_FROM=$(_array_expand "$FINETUNE_FROM" FINETUNE_FROM) || exit 2
  fi
  local i
  for i in "${!USER_ARGS[@]}"; do
    if [[ "${USER_ARGS[$i]}" == *'SLURM_ARRAY_TASK_ID'* ]]; then
      USER_ARGS[i]=$(_array_expand "${USER_ARGS[$i]}" "flag") || exit 2
    fi
  done
  for i in "${!EXTRA_ARGS[@]}"; do
    if [[ "${EXTRA_ARGS[$i]}" == *'SLURM_ARRAY_TASK_ID'* ]]; then
      EXTRA_ARGS[i]=$(_array_expand "${EXTRA_ARGS[$i]}" "EXTRA_ARGS") || exit 2
    fi
  done
}

# Resolve mode, topology and rendezvous into NNODES, NPROC, MASTER_ADDR, MASTER_PORT, RDZV_ID.
_resolve_topology() {
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    MODE=slurm
    NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES is not set}}
    _slurm_gpus
    if [[ -z "${NPROC:-}" ]]; then
      if (( GPUS > 0 )); then NPROC=$GPUS; else NPROC=2; fi
    fi
    command -v scontrol >/dev/null 2>&1 \
      || _die "scontrol not found on PATH (needed for the node list)"
    if [[ -z "${MASTER_ADDR:-}" ]]; then MASTER_ADDR=$(_first_node_addr) || exit 2; fi
    [[ -n "$MASTER_ADDR" ]] || _die "no host in SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
    # per job: jobs may share a node
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    RDZV_ID=$SLURM_JOB_ID
    local job=$SLURM_JOB_ID
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
      job=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID  # as squeue shows an array task
    fi
    LOG_DIR=${LOG_DIR:-$LOG_ROOT/${SLURM_JOB_NAME:-job}-$job}
  else
    MODE=local
    NNODES=1
    GPUS=$(_local_gpus); GPU_SOURCE="nvidia-smi"
    if [[ -z "${NPROC:-}" ]]; then
      NPROC=$GPUS
      (( NPROC > 0 )) || NPROC=2
    fi
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MASTER_PORT=${MASTER_PORT:-$(_free_port)}
    RDZV_ID=local-$$
    LOG_DIR=${LOG_DIR:-$LOG_ROOT/local-$(date +%Y%m%d-%H%M%S)-$$}
  fi
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] \
    || _die "NPROC=$NPROC is not a positive number of processes per node"
  if (( GPUS > 0 )); then DEVICE="GPU ($GPUS per node from $GPU_SOURCE)"
  else DEVICE="CPU (no GPU allocated: gloo; set NPROC for the processes per node)"; fi
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
      local latest
      latest=$(<"$CHECKPOINT_DIR/latest_checkpointed_iteration.txt")
      RESUME="resume from $CHECKPOINT_DIR (iteration $latest)"
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
  local -a srun_extra torchrun_extra
  read -r -a srun_extra <<< "${SRUN_EXTRA_ARGS:-}"
  read -r -a torchrun_extra <<< "${TORCHRUN_EXTRA_ARGS:-}"
  local -a torchrun=("$PYTHON" -m torch.distributed.run
    --nnodes "$NNODES" --nproc_per_node "$NPROC"
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID"
    --max_restarts 0
    --signals_to_handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    --shutdown_timeout "${SHUTDOWN_TIMEOUT:-600}"
    --log_dir "$LOG_DIR/ranks-${SLURM_RESTART_COUNT:-0}" --tee 2
    "${torchrun_extra[@]}")
  if [[ "$MODE" == slurm ]]; then
    # one task per node (torchrun starts the GPU workers); all CPUs of the node to it
    LAUNCH_CMD=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1
                --kill-on-bad-exit=1 --cpu-bind=none "${srun_extra[@]}"
                "${torchrun[@]}" "${TRAIN_ARGS[@]}")
  else
    LAUNCH_CMD=("${torchrun[@]}" "${TRAIN_ARGS[@]}")
  fi
}

# The run's TP/PP/DP layout for NNODES x NPROC processes, checked by the trainer's own parser
# and resolve(): a layout, batch or flag it refuses is an error here (exit 2). Skipped, with a
# line, where the trainer cannot be imported (e.g. a login node without its packages), or with
# LAYOUT_CHECK=0.
_check_layout() {
  local world=$(( NNODES * NPROC )) out rc=0
  if [[ "${LAYOUT_CHECK:-1}" == 0 ]]; then _log "layout not checked (LAYOUT_CHECK=0)"; return 0; fi
  out=$("$PYTHON" - "$world" "${TRAIN_ARGS[@]:2}" 2>&1 <<'PY'
import sys
try:
    from megatron_tempnet.arguments import parse_args, resolve
    from megatron_tempnet.config import ConfigError
except Exception as e:  # noqa: BLE001
    print(f"layout not checked: the trainer cannot be imported here ({type(e).__name__}: {e})")
    sys.exit(3)
world = int(sys.argv[1])
try:
    run = parse_args(sys.argv[2:])
    resolve(run, world)
except ConfigError as e:
    print(f"error: {e}")
    sys.exit(2)
par = run.parallel
tp, pp, vp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.virtual_size
print(f"layout: TP={tp} PP={pp}" + (f" VP={vp}" if vp > 1 else "")
      + f" DP={world // (tp * pp)} on {world} processes")
PY
  ) || rc=$?
  if (( rc == 0 )); then
    _log "${out##*$'\n'}"
  elif (( rc == 2 )); then
    out=${out##*$'\n'}
    _die "the trainer refuses this run on $world processes ($NNODES nodes x $NPROC):" \
      "${out#error: }"
  else
    _log "${out##*$'\n'}"
  fi
}

_git_revision() {
  local rev
  if ! rev=$(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null); then
    echo "unknown (no git checkout)"
    return 0
  fi
  if [[ -n "$(git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    rev+=" (with uncommitted changes)"
  fi
  printf '%s\n' "$rev"
}

# `scontrol show job` of this job, one line ("" when scontrol fails).
_job_info() { scontrol show job "$SLURM_JOB_ID" 2>/dev/null | tr '\n' ' ' || true; }
_job_field() {  # _job_field "<info>" Restarts -> its value
  local re="(^| )$2=([^ ]*)"
  if [[ "$1" =~ $re ]]; then printf '%s' "${BASH_REMATCH[2]}"; fi
}

# Why SIGTERM reached the batch shell (see "Stopping" above): sets STOP.
_classify_term() {
  local info restarts preempt
  info=$(_job_info)
  restarts=$(_job_field "$info" Restarts)
  preempt=$(_job_field "$info" PreemptTime)
  if [[ -z "$info" ]]; then
    STOP=cancelled; STOP_WHY="SIGTERM, and scontrol show job failed: taken as scancel"
  elif [[ "$restarts" =~ ^[0-9]+$ ]] && (( restarts > ${SLURM_RESTART_COUNT:-0} )); then
    STOP=requeued_by_slurm
    STOP_WHY="SIGTERM: SLURM requeues the job (preemption or scontrol requeue)"
  elif [[ -n "$preempt" && "$preempt" != None ]]; then
    STOP=preempted; STOP_WHY="SIGTERM: preempted (PreemptTime=$preempt)"
  elif [[ "$(_job_field "$info" Reason)" == TimeLimit ]]; then
    STOP=time_limit; STOP_WHY="SIGTERM at the time limit"
  elif [[ "$(_job_field "$info" JobState)" == RUNNING ]]; then
    STOP=cancelled; STOP_WHY="SIGTERM to the batch shell alone (scancel --batch, kill): a stop"
  else
    STOP=cancelled
    STOP_WHY="SIGTERM: cancelled (JobState=$(_job_field "$info" JobState), no preemption)"
  fi
}

# Ask the trainer to save and exit: SIGUSR1 to the job steps (SLURM) or torchrun (local).
# Once only: a signal after it was delivered, or after the steps ended, is not forwarded.
_forward_stop() {
  if (( FORWARDED )); then _log "the trainer was asked to save already"; return 0; fi
  if [[ -z "${CHILD_PID:-}" ]] || ! kill -0 "$CHILD_PID" 2>/dev/null; then return 0; fi
  if [[ "$MODE" == slurm ]]; then
    if scancel --signal=USR1 "$SLURM_JOB_ID"; then FORWARDED=1
    else _log "scancel --signal=USR1 $SLURM_JOB_ID failed"; fi
  elif kill -s USR1 "$CHILD_PID" 2>/dev/null; then
    FORWARDED=1
  fi
  return 0
}

_on_signal() {
  local sig=$1
  if [[ "$MODE" != slurm ]]; then
    STOP=${STOP:-signal}; STOP_WHY=${STOP_WHY:-SIG$sig}
    _log "got SIG$sig: asking the trainer to save a checkpoint and exit"
    _forward_stop
    return 0
  fi
  if [[ "$sig" == USR1 ]]; then
    if [[ -z "$STOP" ]]; then
      STOP=usr1; STOP_WHY="SIGUSR1 (time-limit signal or scancel --batch)"
    fi
    _log "got SIGUSR1: asking the trainer to save a checkpoint and exit"
    _forward_stop
    return 0
  fi
  if [[ -n "$STOP" && "$STOP" != cancelled ]]; then
    _log "got SIGTERM after $STOP_WHY: the trainer saves; the job ends"
    return 0
  fi
  _classify_term
  _log "got $STOP_WHY"
  if [[ "$STOP_WHY" == *"batch shell alone"* ]]; then _forward_stop; fi
}

# The trainer's exit code from CHECKPOINT_DIR/exit_status.json when this attempt wrote it:
# its slurm_job_id is this job's (SLURM) and its time not before epoch seconds $1; empty for
# a stale record (another run or attempt), a "running" record (killed) or none.
_trainer_exit_code() {
  local f="$CHECKPOINT_DIR/exit_status.json"
  [[ "$CHECKPOINT_DIR" != none && -f "$f" ]] || return 0
  "$PYTHON" - "$f" "$1" "${SLURM_JOB_ID:-}" 2>/dev/null <<'PY' || true
import datetime, json, sys
path, started, job = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rec = json.load(open(path))
when = datetime.datetime.strptime(rec["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
fresh = when >= started and (not job or str(rec.get("slurm_job_id")) == job)
if fresh and isinstance(rec.get("exit_code"), int):
    print(rec["exit_code"])
PY
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

_requeue() {
  if (( ${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-50} )); then
    _log "stopped with a checkpoint, but requeued ${SLURM_RESTART_COUNT:-0} times already" \
      "(MAX_REQUEUES=${MAX_REQUEUES:-50}): not again"
    return "$EXIT_CODE_PREEMPTED"
  fi
  _log "stopped with a checkpoint ($1): requeueing job $SLURM_JOB_ID"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    _log "scontrol requeue $SLURM_JOB_ID failed: sbatch the script again to resume"
    return "$EXIT_CODE_PREEMPTED"
  fi
  return 0
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
  if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON=$REPO_DIR/.venv/bin/python; fi
  fi
  LOG_ROOT=${LOG_ROOT:-$REPO_DIR/logs}
  EXTRA_ARGS=("${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")
  _expand_array_settings
  [[ -f "$RUN_CONFIG" ]] || _die "RUN_CONFIG=$RUN_CONFIG does not exist (relative to $REPO_DIR)"
  _resolve_topology
  _trainer_args
  _launch_command
  local log="$LOG_DIR/attempt-${SLURM_RESTART_COUNT:-0}.log"

  if [[ "$dry_run" == 1 ]]; then
    _log "dry run: mode=$MODE nnodes=$NNODES nproc_per_node=$NPROC world_size=$(( NNODES * NPROC ))"
    _log "device: $DEVICE"
    _check_layout
    _log "rendezvous: c10d $MASTER_ADDR:$MASTER_PORT id $RDZV_ID"
    _log "checkpoint: $RESUME; log: $log"
    local names='CUDA_DEVICE_MAX_CONNECTIONS|TORCH_NCCL_[A-Z_]*|NCCL_[A-Z_]*|OMP_NUM_THREADS'
    ( _export_env; env | grep -E "^($names)=" | sort | sed 's/^/export /' )
    _quote "${LAUNCH_CMD[@]}"
    return 0
  fi

  if [[ -n "${DEEPSPEED_CONFIG:-}" && ! -f "$DEEPSPEED_CONFIG" ]]; then
    _die "DEEPSPEED_CONFIG=$DEEPSPEED_CONFIG does not exist (relative to $REPO_DIR)"
  fi
  _export_env
  mkdir -p "$LOG_DIR"
  [[ "$CHECKPOINT_DIR" == none ]] || mkdir -p "$CHECKPOINT_DIR"
  ATTEMPT_LOG=$log
  _log "$(date '+%Y-%m-%dT%H:%M:%S%z') host $(hostname) job ${SLURM_JOB_ID:-none}" \
    "attempt ${SLURM_RESTART_COUNT:-0}; commit $(_git_revision)"
  _log "mode=$MODE nnodes=$NNODES nproc_per_node=$NPROC rendezvous $MASTER_ADDR:$MASTER_PORT;" \
    "checkpoint: $RESUME"
  _log "device: $DEVICE; log: $log"
  _quote "${LAUNCH_CMD[@]}" >> "$log"

  STOP="" STOP_WHY="" FORWARDED=0 CHILD_PID=""
  local started offset
  started=$(date +%s)
  offset=$(stat -c %s "$log")
  trap '_on_signal USR1' USR1
  trap '_on_signal TERM' TERM
  # srun (torchrun) writes the attempt's log itself: nothing between them that a SIGTERM to
  # the batch step could kill; `tail` (deaf to SIGTERM) copies it to the job's output.
  "${LAUNCH_CMD[@]}" >> "$log" 2>&1 < /dev/null &
  CHILD_PID=$!
  ( trap '' TERM INT HUP; exec tail -c "+$(( offset + 1 ))" -s 0.2 -f --pid="$CHILD_PID" "$log" ) &
  local tail_pid=$! rc=0
  TAILING=1
  _wait_child "$CHILD_PID" || rc=$?
  _wait_child "$tail_pid" || true
  TAILING=0
  trap - USR1 TERM

  local code=$rc trainer_rc
  trainer_rc=$(_trainer_exit_code "$started")
  if [[ -n "$trainer_rc" ]] && (( rc != 0 )); then
    code=$trainer_rc  # the trainer's own code (torchrun reports every failure as 1)
  fi
  local saved=0
  if (( code == EXIT_CODE_PREEMPTED || code == EXIT_CODE_TIME_LIMIT )); then saved=1
  elif [[ -z "$trainer_rc" ]] && (( rc != 0 )) && grep -Eq \
      "exitcode +: +($EXIT_CODE_PREEMPTED|$EXIT_CODE_TIME_LIMIT)( |$)" "$log" 2>/dev/null; then
    saved=1
  fi
  local what="exit code $code${trainer_rc:+ (from exit_status.json)}"
  if [[ -n "$STOP" ]]; then what="$STOP_WHY; $what"; fi

  if [[ "$MODE" != slurm ]]; then
    if (( saved )) || [[ -n "$STOP" && "$code" != 0 ]]; then
      _log "preempted ($what): checkpoint in $CHECKPOINT_DIR; run the same command again to resume"
      return "$EXIT_CODE_PREEMPTED"
    fi
  else
    case "$STOP" in
      requeued_by_slurm)
        _log "stopped ($what); SLURM requeues the job itself"
        return "$code" ;;
      cancelled)
        if (( code == 0 )); then _log "finished"; return 0; fi
        _log "cancelled ($what): not requeued; sbatch the script again to resume from" \
          "$CHECKPOINT_DIR"
        return "$code" ;;
      usr1|preempted|time_limit)
        if (( code == 0 )); then _log "finished"; return 0; fi
        # torchrun killed by the signal without a record: as before, requeue
        if (( saved )) || [[ -z "$trainer_rc" ]]; then _requeue "$what"; return $?; fi ;;
      *)
        if (( saved )); then _requeue "$what"; return $?; fi ;;
    esac
  fi
  if (( code == 0 )); then _log "finished"; else _log "trainer failed with $what (log: $log)"; fi
  return "$code"
}

"""DeepSpeed ZeRO-1/2 as the second engine around the same megatron-core model stage.

What changes against the megatron-core path (training/ddp.py + training/optim.py + the
schedules in training/step.py), and what does not:

| | megatron-core path | DeepSpeed path (this module) |
|---|---|---|
| model | GPTModel / TempNetGPTModel stage | the same module, unwrapped |
| data parallelism | megatron-core DDP (+ distributed optimizer) | ZeRO stage 1 or 2 (``--deepspeed_config``) |
| tensor parallelism | megatron-core layers | the same; DeepSpeed learns the groups from :class:`MegatronMPU` |
| pipeline parallelism | megatron-core schedules | not supported (PP=1 only, a clear error) |
| optimizer | megatron-core Adam (torch AdamW without apex/TE) | torch AdamW from our side, same groups (``optim.torch_param_groups``) |
| lr / wd schedule | ``optim.Scheduler`` | the same ``optim.Scheduler`` on the AdamW groups |
| loss | sum over tokens / global token count | the same (see :func:`deepspeed_train_step`) |

The DeepSpeed JSON holds what only DeepSpeed knows (ZeRO stage, buckets, overlap); the training
flags stay the source of truth for batch sizes, clipping and precision. A JSON value may be
``"auto"`` (or absent): it is filled from the flags. An explicit value must agree with them, or
:func:`resolve_deepspeed_config` raises an error naming the key, the flag and the fix. An
``optimizer`` or ``scheduler`` section is refused: ours are passed in (DeepSpeed would otherwise
JIT-compile FusedAdam, and its schedules do not know TempNet's constant-lr group).

Checkpoints (:class:`DeepSpeedCheckpointer`): DeepSpeed's own ``engine.save_checkpoint`` /
``load_checkpoint`` write and read ``--save DIR/iter_0000100/`` (the tag), inside the protocol
of ``training/checkpointing.py``: our ``latest_checkpointed_iteration.txt`` (written by rank 0
after every rank finished and a barrier) names the current tag, which is passed explicitly on
load; DeepSpeed's own ``latest`` file is not written. Its ``client_state`` carries iteration,
consumed samples, the Scheduler's state, every rank's RNG states and the run record (shape
check); resume is bitwise identical to an uninterrupted run (ZeRO-1 and ZeRO-2, fp32 on CPU).

CPU runs (gloo): DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce op on
first use (~45 s, a C++ toolchain needed). :func:`build_deepspeed_engine` marks it incompatible
(``deepspeed.ops.__compatible_ops__``, the documented cache of the op probe) unless
``cpu_shm_allreduce=True``; collectives then go through torch.distributed (gloo).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tempnet.config import ConfigError, TrainConfig
from megatron_tempnet.parallel.runtime import ParallelContext
from megatron_tempnet.training.checkpointing import (Checkpointer, LoadPlan, _unwrap,
                                                     fresh_train_state,
                                                     model_weights_loaded)
from megatron_tempnet.training.optim import build_scheduler, torch_param_groups
from megatron_tempnet.training.step import ReportSpec, StepOutput, masked_sum_loss

ZERO_STAGES = (1, 2)
AUTO = "auto"


def deepspeed_available() -> bool:
    """Whether deepspeed is installed (without importing it: the import takes ~4 s)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


# ---------------------------------------------------------------------------------------------
# The DeepSpeed JSON against the training flags
# ---------------------------------------------------------------------------------------------

def _settle(ds: dict, path: tuple, want, flag: str, source: str):
    """Fill ``ds[path]`` with ``want`` when absent or "auto"; else check that it equals it."""
    *parents, key = path
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    have = node.get(key, AUTO)
    if have == AUTO:
        node[key] = want
    elif have != want:
        raise ConfigError(
            f"{source}: {'.'.join(path)} = {have!r} disagrees with {flag} (which gives {want!r}); "
            f"the training flags are the source of truth: set it to \"auto\" (or {want!r}) in "
            f"the JSON, or change {flag}")


def resolve_deepspeed_config(config: str | Path | dict, train: TrainConfig,
                             dp_size: int) -> dict:
    """The DeepSpeed config dict for these flags: "auto" values filled, explicit ones checked.

    Batch sizes: train_micro_batch_size_per_gpu = --micro-batch-size; train_batch_size =
    --global-batch-size; gradient_accumulation_steps = global / (micro x data-parallel size),
    the number of micro-batches per step as in the megatron-core path. Also gradient_clipping =
    --clip-grad, bf16.enabled / fp16.enabled from --precision. ZeRO stage must be 1 or 2.
    """
    if isinstance(config, dict):
        ds, source = copy.deepcopy(config), "DeepSpeed config"
    else:
        source = f"--deepspeed_config {config}"
        try:
            ds = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{source}: cannot read a JSON object ({e})") from e
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{source}: remove the {section!r} section; megatron-tempnet passes its own "
                f"{'AdamW (from --lr, --weight-decay, --adam-*)' if section == 'optimizer' else 'lr schedule (--lr-decay-style, --lr-warmup-iters, ...)'}"
                " so that TempNet keeps its own parameter group")
    train.validate(dp_size)
    _settle(ds, ("train_micro_batch_size_per_gpu",), train.micro_batch_size,
            "--micro-batch-size", source)
    _settle(ds, ("train_batch_size",), train.global_batch_size, "--global-batch-size", source)
    _settle(ds, ("gradient_accumulation_steps",), train.num_microbatches(dp_size),
            f"--global-batch-size / (--micro-batch-size x data-parallel size {dp_size})", source)
    _settle(ds, ("gradient_clipping",), float(train.clip_grad), "--clip-grad", source)
    _settle(ds, ("bf16", "enabled"), train.precision == "bf16", "--precision", source)
    _settle(ds, ("fp16", "enabled"), train.precision == "fp16", "--precision", source)
    stage = ds.setdefault("zero_optimization", {}).setdefault("stage", 1)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"{source}: zero_optimization.stage = {stage!r}; megatron-tempnet "
                          f"supports ZeRO stages {ZERO_STAGES} (stage 3 partitions parameters, "
                          "which megatron-core's tensor-parallel layers do not expect)")
    return ds


# ---------------------------------------------------------------------------------------------
# DeepSpeed's view of the process groups
# ---------------------------------------------------------------------------------------------

class MegatronMPU:
    """The ``mpu`` object DeepSpeed reads process groups from, answered by a ParallelContext.

    DeepSpeed (0.19.x) calls the model-parallel getters (grad-norm reduction over tensor
    parallelism, counting replicated parameters on model-parallel rank 0 only), the
    data-parallel getters (ZeRO partitioning and gradient averaging), the tensor-parallel
    getters (``deepspeed.utils.bwc``) and the pipeline size. With PP=1 the model-parallel group
    is the tensor-parallel group.
    """

    def __init__(self, ctx: ParallelContext):
        if ctx.pp_size != 1:
            raise ConfigError(f"--deepspeed supports --pipeline-model-parallel-size 1 only, got "
                              f"{ctx.pp_size}: megatron-core's pipeline schedules run under its "
                              "own DDP, not under DeepSpeed's engine; drop --deepspeed to use "
                              "pipeline parallelism, or use tensor/data parallelism")
        self.ctx = ctx

    # model parallel (= tensor parallel at PP=1)
    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_model_parallel_group(self):
        return self.ctx.tp_group

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ctx.tp_size

    def get_tensor_model_parallel_group(self):
        return self.ctx.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.ctx.tp_group)[0]

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp_size

    def get_data_parallel_group(self):
        return self.ctx.dp_group

    def get_data_parallel_group_ranks(self) -> list:
        return dist.get_process_group_ranks(self.ctx.dp_group)

    # pipeline parallel (always 1 here)
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.ctx.pp_group


# ---------------------------------------------------------------------------------------------
# Engine and step
# ---------------------------------------------------------------------------------------------

def _disable_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-building its shared-memory all-reduce op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def _scalar_params_broadcast_by_us(model: torch.nn.Module, ctx: ParallelContext):
    """DeepSpeed 0.19.8's engine broadcasts every parameter from the first data-parallel rank
    as ``p.data.view(torch.uint8)``, which fails for 0-d parameters (TempNet's pool_scale and
    pool_c). Those are broadcast here instead (torch.distributed handles 0-d tensors), and
    DeepSpeed is told to skip them through the marker its engine checks for parameters it
    must not broadcast (``ds_optim_param``; read elsewhere only with LoRA offload), removed
    again once the engine is built."""
    scalars = [p for p in model.parameters() if p.dim() == 0]
    if ctx.dp_size > 1:
        src = dist.get_process_group_ranks(ctx.dp_group)[0]
        for p in scalars:
            dist.broadcast(p.data, src=src, group=ctx.dp_group)
    for p in scalars:
        p.ds_optim_param = True
    try:
        yield
    finally:
        for p in scalars:
            del p.ds_optim_param


def build_deepspeed_engine(model: torch.nn.Module, train: TrainConfig, ctx: ParallelContext,
                           deepspeed_config: str | Path | dict, *, tempnet_cfg=None,
                           cpu_shm_allreduce: bool = False, log_level: int = logging.WARNING):
    """Wrap this rank's model stage in a DeepSpeed engine (ZeRO 1/2); returns
    ``(engine, scheduler)``.

    The optimizer is torch AdamW over ``optim.torch_param_groups`` (LM decay / no decay /
    TempNet's own group), with --adam-beta1/2, --adam-eps; the scheduler is ``optim.Scheduler``
    on those groups (call ``scheduler.step(increment=1)`` after each step, as the megatron-core
    loop does). ``log_level`` is applied to DeepSpeed's logger (its INFO level prints the whole
    config on every rank).
    """
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    mpu = MegatronMPU(ctx)  # refuses PP > 1
    ds_config = resolve_deepspeed_config(deepspeed_config, train, ctx.dp_size)
    ds_logger.setLevel(log_level)
    if not cpu_shm_allreduce:
        _disable_cpu_shm_allreduce()
    groups = torch_param_groups(model, train, tempnet_cfg)
    optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay,
                                  betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    with _scalar_params_broadcast_by_us(model, ctx):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                               config=ds_config, dist_init_required=False)
    # The scheduler steps the base optimizer's groups: ZeRO keeps those dicts (their params
    # replaced by the flat fp32 partitions), so lr and weight decay reach the update.
    scheduler = build_scheduler(optimizer, train)
    return engine, scheduler


def deepspeed_train_step(engine, scheduler, batches, num_microbatches: int,
                         spec: ReportSpec | None = None):
    """One optimizer step (and lr step) over ``num_microbatches`` micro-batches of this DP rank.

    Same objective as the megatron-core path: sum of per-token losses over the global batch
    divided by the global (loss-mask weighted) token count N. DeepSpeed averages gradients over
    the D data-parallel ranks (ZeRO's reduce divides by D) and, with ``scale_wrt_gas``, divides
    each micro-batch loss by the accumulation steps. So N is counted first (one all-reduce of
    the masks' sums over data-parallel ranks) and each micro-batch backpropagates
    ``loss_sum * D / N`` with ``scale_wrt_gas=False``: the reduced gradient is then exactly
    d(sum / N).

    Returns a ``training.step.StepOutput`` like the megatron-core step: the per-micro-batch
    reports (reduce them with ``training.step.global_metrics``), the grad norm, whether the
    update happened (fp16 loss scaling may skip it; the lr schedule then waits, as on the
    megatron-core path) and the LM's lr after the scheduler step. ``spec``: the model's loss
    channels and the tau histogram (``step.masked_sum_loss``).
    """
    gas = engine.gradient_accumulation_steps()
    if num_microbatches != gas:
        raise ConfigError(f"{num_microbatches} micro-batches per step, but the DeepSpeed engine "
                          f"accumulates {gas}: build the engine with the same --global-batch-size "
                          "and --micro-batch-size")
    mpu = engine.mpu
    dp_group, dp_size = mpu.get_data_parallel_group(), mpu.get_data_parallel_world_size()
    micro = [next(batches) for _ in range(num_microbatches)]
    device = engine.device
    num_tokens = sum(b["loss_mask"].float().sum() for b in micro).to(device)  # 0-d
    if dp_size > 1:
        dist.all_reduce(num_tokens, group=dp_group)
    scale = dp_size / num_tokens.clamp(min=1)

    reports, skipped = [], engine.skipped_steps
    for batch in micro:
        batch = {k: v.to(device) for k, v in batch.items()}
        output = engine(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                        loss_mask=batch["loss_mask"])
        loss_sum, _, report = masked_sum_loss(batch["loss_mask"], output, spec=spec)
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        engine.step()  # updates at the accumulation boundary (the last micro-batch) only
        reports.append(report)
    updated = engine.skipped_steps == skipped
    if updated:
        scheduler.step(increment=1)
    grad_norm = engine.get_global_grad_norm()
    return StepOutput(reports, None if grad_norm is None else float(grad_norm), updated,
                      scheduler.get_lr(scheduler.optimizer.param_groups[0]))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

MODEL_STATES = "mp_rank_{:02d}_model_states.pt"  # DeepSpeed's file per tensor-parallel rank


class DeepSpeedCheckpointer(Checkpointer):
    """--save / --load with DeepSpeed's ``engine.save_checkpoint`` / ``engine.load_checkpoint``.

    Layout: ``DIR/latest_checkpointed_iteration.txt`` and ``DIR/iter_NNNNNNN/`` as in
    ``training/checkpointing.py`` (whose save protocol, keep-last, shape check and resume
    decisions this class reuses); an ``iter_*`` directory is one DeepSpeed tag::

        mp_rank_{tp:02d}_model_states.pt   module weights + our client_state (written by the
                                           first data-parallel rank of each tensor-parallel rank)
        zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt   ZeRO's optimizer partition per rank

    client_state: iteration, consumed_samples, scheduler (our Scheduler; the engine has none),
    checkpoint_version, config (the run record) and ``rng_state``: the RNG states of every
    data-parallel rank (gathered, since DeepSpeed writes the client state of the first one
    only), indexed by data-parallel rank. Loads need the same tensor-parallel size; the
    optimizer (ZeRO partitions) also the same data-parallel size, else ``--no-load-optim``.
    """

    FORMAT = "deepspeed"

    def __init__(self, cfg, engine, scheduler, ctx: ParallelContext, record: dict, log=print):
        super().__init__(cfg, [engine.module], engine.optimizer, scheduler, ctx, record, log)
        self.engine = engine

    def write(self, path: Path, train_state: dict, rng: dict) -> None:
        rngs = [rng]
        if self.ctx.dp_size > 1:
            rngs = [None] * self.ctx.dp_size
            dist.all_gather_object(rngs, rng, group=self.ctx.dp_group)
        client_state = {**self.common_state(train_state), "rng_state": rngs}
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state,
                                    save_latest=False)

    def load(self) -> dict:
        """Restore from ``--load``; returns the trainer's saved state (iteration,
        consumed_samples), a fresh start when nothing was loaded or with --finetune (module
        weights only, TempNet may be absent)."""
        plan = self.plan_load(read_client_state)
        if plan is None:
            return fresh_train_state()
        self._check_layout(plan)
        skipped = self._check_module_keys(plan) if not plan.resume else []
        load_path, client = self.engine.load_checkpoint(
            str(plan.path.parent), tag=plan.path.name, load_module_strict=plan.resume,
            load_optimizer_states=plan.load_optim, load_lr_scheduler_states=False,
            load_module_only=not plan.resume)
        if load_path is None:
            raise ConfigError(f"checkpoint {plan.path}: DeepSpeed found no "
                              f"{MODEL_STATES.format(self.ctx.tp_rank)} in it")
        rng = client["rng_state"][self.ctx.dp_rank] if plan.load_rng else None
        return self.finish_load(plan, client.get("scheduler"), rng, model_weights_loaded(skipped))

    def _check_layout(self, plan: LoadPlan) -> None:
        """DeepSpeed does not reshard: same TP (module shards per tensor-parallel rank); same DP
        for the optimizer (ZeRO partitions per data-parallel rank)."""
        saved, now = plan.saved["config"]["parallel"], self.layout()
        if saved["tp"] != now["tp"]:
            raise ConfigError(
                f"checkpoint {plan.path} was saved at --tensor-model-parallel-size {saved['tp']}, "
                f"this run uses {now['tp']}: DeepSpeed checkpoints load at the tensor-parallel "
                "size they were saved with")
        if plan.load_optim and saved["dp"] != now["dp"]:
            raise ConfigError(
                f"checkpoint {plan.path} was saved at data-parallel size {saved['dp']}, this run "
                f"has {now['dp']}: ZeRO's optimizer partitions load at the same size only; resume "
                f"on {saved['dp'] * saved['tp']} ranks, or add --no-load-optim (weights, iteration "
                "and data position load, the optimizer starts fresh)")

    def _check_module_keys(self, plan: LoadPlan) -> list[str]:
        """--finetune: every LM tensor must be in the checkpoint; TempNet's may be absent (they
        keep their init) or extra (a TempNet checkpoint into a plain-CE run). Returns the
        TempNet keys kept at init."""
        saved = set(plan.saved["module"])
        own = [k for k in _unwrap(self.chunks[0]).state_dict() if not k.endswith("_extra_state")]
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved - set(own)
                      if not k.startswith("tempnet.") and not k.endswith("_extra_state")]
        lm_missing = [k for k in missing if not k.startswith("tempnet.")]
        if lm_missing or unexpected:
            raise ConfigError(f"checkpoint {plan.path}: missing {lm_missing}, unexpected "
                              f"{sorted(unexpected)} model keys")
        return missing


class DeepSpeedModelLoader(DeepSpeedCheckpointer):
    """Model weights only from a DeepSpeed checkpoint, without a DeepSpeed engine (evaluation,
    the DeepSpeed -> megatron-core conversion): each tensor-parallel rank reads the module
    weights of its own ``mp_rank_{tp:02d}_model_states.pt``, after the checks of a load (run
    record, shapes, TempNet settings). DeepSpeed does not reshard: the same TP, PP = 1; other
    layouts go through tools/convert_deepspeed_checkpoint.py (a megatron-core checkpoint)."""

    def __init__(self, cfg, model_chunks: list, ctx: ParallelContext, record: dict, log=print):
        Checkpointer.__init__(self, cfg, model_chunks, None, None, ctx, record, log)
        self.engine = None

    def load(self) -> dict:
        plan = self.plan_load(read_client_state)
        if plan is None:
            return fresh_train_state()
        saved = plan.saved["config"]["parallel"]
        if saved["tp"] != self.ctx.tp_size or self.ctx.pp_size != 1 or len(self.chunks) != 1:
            raise ConfigError(
                f"checkpoint {plan.path} is a DeepSpeed checkpoint saved at "
                f"--tensor-model-parallel-size {saved['tp']}: it loads at that TP with PP=1 only "
                f"(this run: TP={self.ctx.tp_size}, PP={self.ctx.pp_size}); for another layout "
                f"convert it first: python tools/convert_deepspeed_checkpoint.py --load "
                f"{self.cfg.load} --save <new dir>")
        skipped = self._check_module_keys(plan) if not plan.resume else []
        missing, unexpected = _unwrap(self.chunks[0]).load_state_dict(
            read_module_states(plan.path, self.ctx.tp_rank), strict=False)
        if plan.resume:  # every tensor, as DeepSpeed's strict load of a resume
            missing = [m for m in missing if not m.endswith("_extra_state")]
            unexpected = [u for u in unexpected if not u.endswith("_extra_state")]
            if missing or unexpected:
                raise ConfigError(f"checkpoint {plan.path}: missing {missing}, unexpected "
                                  f"{unexpected} model keys")
        return self.finish_load(plan, None, None, model_weights_loaded(skipped))


def read_module_states(path: Path, tp_rank: int) -> dict:
    """The module weights (state dict) tensor-parallel rank ``tp_rank`` saved into the
    DeepSpeed checkpoint directory ``path``."""
    file = path / MODEL_STATES.format(tp_rank)
    if not file.exists():
        raise ConfigError(f"checkpoint {path}: {file.name} is missing (a DeepSpeed checkpoint "
                          "holds one per tensor-parallel rank): copy the whole directory")
    return torch.load(file, map_location="cpu", weights_only=False)["module"]


def read_client_state(path: Path) -> dict:
    """The state saved with tensor-parallel rank 0's module weights, tensors memory-mapped
    (nothing is read but the pickle): the client state and the module's keys."""
    file = path / MODEL_STATES.format(0)
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    if "config" not in state:
        raise ConfigError(f"checkpoint {path}: {file.name} has no run record in its client state "
                          "(a DeepSpeed checkpoint not written by megatron-tempnet)")
    return state

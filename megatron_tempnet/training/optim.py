"""megatron-core optimizer (Adam, optionally distributed) and its learning-rate scheduler.

TempNet's parameters (marked ``is_tempnet_parameter`` by ``models.tempnet_gpt``) form their own
parameter group through megatron-core's ``config_overrides`` (keyed by ``ParamKey``), with
TempNetConfig's lr and weight decay (docs/tempnet_math.md section 2.6):
- lr_schedule "constant" (default, as upstream): the group carries ``constant_lr``, which
  :class:`Scheduler` returns for it at every step, warmup included (megatron-core's scheduler
  alone would ramp every group from its ``init_lr`` during warmup);
- lr_schedule "lm": the group follows the LM's warmup/decay with ``max_lr`` = TempNetConfig.lr and
  ``min_lr`` scaled by the LM's min_lr / lr (fields megatron-core's scheduler reads per group).
Its weight decay applies to all TempNet parameters (start_wd = end_wd = TempNetConfig.weight_decay,
wd_mult 1); LM parameters keep megatron's rule (no decay on biases and 1-D parameters).
Frozen parameters (requires_grad False, training_mode "frozen_lm") are in no group: no state.
megatron-core matches saved and live groups by (wd_mult, lr_mult, is_expert_parallel,
is_decoupled_lr) on checkpoint load; TempNet's group sets ``is_decoupled_lr`` (its lr is decoupled
from the LM's; nothing else reads that field in 0.16.x) so that it never collides with an LM group.
"""
from __future__ import annotations

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_tempnet.config import TrainConfig
from megatron_tempnet.models.tempnet_gpt import TEMPNET_PARAM_ATTR


def build_optimizer(model_chunks: list, train: TrainConfig, *, use_distributed_optimizer: bool,
                    tempnet_cfg=None):
    """megatron-core optimizer over the trainable parameters; ``tempnet_cfg`` (a TempNetConfig)
    gives TempNet's parameters their own group (ignored when the model has none).

    fp16 (``--precision fp16``): megatron-core's dynamic loss scaler (initial scale 2^16,
    hysteresis 2, window 1000). The optimizer unscales the gradients by its scale, so the model
    chunks' config gets ``grad_scale_func = optimizer.scale_loss`` (what Megatron-LM's train()
    sets): the schedules multiply each micro-batch's loss by the scale before backward. A step
    with non-finite scaled gradients is skipped (``step()`` returns update False, no grad norm);
    the scale halves at every such step once ``hysteresis`` of them were seen since it last
    grew (the 1st overflow keeps 2^16, the 2nd halves it, and so on)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=train.precision == "bf16",
        fp16=train.precision == "fp16", params_dtype=precision_dtype(train.precision),
        use_distributed_optimizer=use_distributed_optimizer,
        loss_scale=None, initial_loss_scale=2.0**16)
    overrides = None if tempnet_cfg is None else param_group_overrides(train, tempnet_cfg)
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
    if config.fp16:
        for chunk in model_chunks:
            chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def is_tempnet_param(param) -> bool:
    return getattr(param, TEMPNET_PARAM_ATTR, False)


def is_lm_no_decay(param, name: str) -> bool:
    """megatron's classic rule, LM only: no weight decay on biases and 1-D parameters."""
    return (param.dim() == 1 or name.endswith(".bias")) and not is_tempnet_param(param)


def tempnet_group_options(train: TrainConfig, tempnet_cfg) -> dict:
    """TempNet's group: its own lr (constant, or the LM's schedule scaled) and weight decay."""
    t = tempnet_cfg
    group = {"start_wd": t.weight_decay, "end_wd": t.weight_decay, "wd_mult": 1.0,
             "max_lr": t.lr, "is_decoupled_lr": True}
    if t.lr_schedule == "constant":
        group.update(min_lr=t.lr, constant_lr=t.lr)
    else:  # "lm": the LM's schedule scaled so that its peak is TempNet's lr
        group.update(min_lr=t.lr * train.min_lr / train.lr if train.lr else 0.0)
    return group


def param_group_overrides(train: TrainConfig, tempnet_cfg) -> dict:
    """megatron-core config_overrides: the LM's no-decay rule and TempNet's own group."""
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate

    lm_no_decay = ParamWithNamePredicate(name="lm_bias_or_1d", fn=is_lm_no_decay)
    return {ParamKey(with_name_predicate=lm_no_decay): {"wd_mult": 0.0},
            ParamKey(attr=TEMPNET_PARAM_ATTR): tempnet_group_options(train, tempnet_cfg)}


def torch_param_groups(model: torch.nn.Module, train: TrainConfig, tempnet_cfg=None) -> list:
    """The parameter groups megatron-core builds from :func:`param_group_overrides`, for a plain
    torch optimizer (DeepSpeed's engine takes one): LM with decay, LM without decay (biases and
    1-D), TempNet's own group; each carries the keys :class:`Scheduler` reads (max_lr, min_lr,
    wd_mult, constant_lr, ...). Frozen parameters are in no group; empty groups are dropped."""
    defaults = {"wd_mult": 1.0, "lr_mult": 1.0, "is_decoupled_lr": False,
                "max_lr": train.lr, "min_lr": train.min_lr}
    groups = {"lm": {**defaults, "params": [], "default_config": True},
              "lm_no_decay": {**defaults, "params": [], "default_config": True, "wd_mult": 0.0},
              "tempnet": {**defaults, "params": [], "default_config": False,
                          **(tempnet_group_options(train, tempnet_cfg) if tempnet_cfg else {})}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = ("tempnet" if is_tempnet_param(param) and tempnet_cfg is not None else
               "lm_no_decay" if is_lm_no_decay(param, name) else "lm")
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


class Scheduler(OptimizerParamScheduler):
    """megatron-core's OptimizerParamScheduler; a param group with ``constant_lr`` keeps it."""

    def get_lr(self, param_group: dict) -> float:
        if param_group.get("constant_lr") is not None:
            return param_group["constant_lr"]
        return super().get_lr(param_group)


def build_scheduler(optimizer, train: TrainConfig):
    return Scheduler(
        optimizer, init_lr=0.0 if train.lr_warmup_iters else train.lr, max_lr=train.lr,
        min_lr=train.min_lr, lr_warmup_steps=train.lr_warmup_iters,
        lr_decay_steps=train.lr_decay_iters or train.train_iters,
        lr_decay_style=train.lr_decay_style, start_wd=train.weight_decay,
        end_wd=train.weight_decay, wd_incr_steps=train.train_iters, wd_incr_style="constant")


def precision_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

"""megatron-core optimizer (Adam, optionally distributed) and its learning-rate scheduler."""
from __future__ import annotations

import torch

from megatron_tempnet.config import TrainConfig


def build_optimizer(model_chunks: list, train: TrainConfig, *, use_distributed_optimizer: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=train.precision == "bf16",
        fp16=train.precision == "fp16", params_dtype=precision_dtype(train.precision),
        use_distributed_optimizer=use_distributed_optimizer,
        loss_scale=None, initial_loss_scale=2.0**16)
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer, train: TrainConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if train.lr_warmup_iters else train.lr, max_lr=train.lr,
        min_lr=train.min_lr, lr_warmup_steps=train.lr_warmup_iters,
        lr_decay_steps=train.lr_decay_iters or train.train_iters,
        lr_decay_style=train.lr_decay_style, start_wd=train.weight_decay,
        end_wd=train.weight_decay, wd_incr_steps=train.train_iters, wd_incr_style="constant")


def precision_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

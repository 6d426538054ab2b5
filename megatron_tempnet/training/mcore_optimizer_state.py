"""megatron-core's optimizer state in a checkpoint: the reshardable sharded state dict
(:data:`OPTIMIZER_METADATA`) and the workarounds megatron-core 0.16.1 with torch's Adam (no apex /
Transformer Engine) needs on load: :func:`ensure_optimizer_state` and
:func:`load_optimizer_state`."""
from __future__ import annotations

import gc

import torch

# megatron-core's distributed-optimizer checkpoint format, reshardable across TP, PP and DP
# (0.16.1's default "fully_sharded_model_space" fails: "flattened_range is not supported").
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "chained_optim_avoid_prefix": True}


def optimizer_sharded_state_dict(optimizer, model_state_dict: dict, is_loading: bool = False):
    """optimizer.sharded_state_dict; megatron-core runs gc.collect() in it (fully_reshardable),
    which costs ~0.4 s per call over an interpreter full of modules: frozen objects are skipped."""
    gc.freeze()
    try:
        return optimizer.sharded_state_dict(model_state_dict, is_loading=is_loading,
                                            metadata=OPTIMIZER_METADATA)
    finally:
        gc.unfreeze()


def ensure_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state before a load (megatron-core 0.16's
    DistributedOptimizer.state_dict asserts one common 'step' and finds none with torch's Adam,
    i.e. without apex / Transformer Engine); the load then overwrites every value."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}


def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict``, around two issues of megatron-core 0.16.1's
    DistributedOptimizer with torch's Adam (no apex / Transformer Engine, e.g. on the CPU):
    (a) its load_state_dict gives every Adam state a 'step' and then copies every state key from
        the checkpoint's per-parameter tensors, which have no 'step' (KeyError);
    (b) all those states share ONE step tensor, which torch's Adam increments once per parameter.
    So: load groups and step first, then the parameter state without 'step', then give each
    parameter its own step tensor."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state_dict] if len(opts) == 1 else [v for _, v in sorted(state_dict.items())]
    for opt, state in zip(opts, states):
        if not (isinstance(opt, DistributedOptimizer) and "param_state" in state):
            opt.load_state_dict(state)
            continue
        state = dict(state)
        param_state, kind = state.pop("param_state"), state.pop("param_state_sharding_type")
        opt.load_state_dict(state)  # param groups, step, state allocation
        adam = opt.optimizer.state
        steps = {p: s.pop("step") for p, s in adam.items() if "step" in s}
        getattr(opt, f"load_parameter_state_from_{PARAM_STATE_LOADERS[kind]}")(param_state)
        for p, step in steps.items():
            adam[p]["step"] = step.clone()


# Param-group entries the scheduler reads (kept from this run under
# --override-opt-param-scheduler; the optimizer's load replaces them with the checkpoint's).
SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "constant_lr", "weight_decay", "start_wd", "end_wd",
                       "lr_mult", "wd_mult")


# DistributedOptimizer param_state_sharding_type -> its load_parameter_state_from_* method
PARAM_STATE_LOADERS = {"fully_reshardable": "fully_reshardable",
                       "fully_sharded_model_space": "fs_model_space",
                       "dp_reshardable": "dp_reshardable", "dp_zero_gather_scatter": "dp_zero"}

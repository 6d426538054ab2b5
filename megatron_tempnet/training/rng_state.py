"""Every random generator's state (python, numpy, torch CPU / CUDA, megatron's RNG tracker):
read before a save and restored after it (saving moves no generator), and stored in a
checkpoint as one ShardedObject per rank, so that a resume is bitwise exact."""
from __future__ import annotations

import random

import numpy as np
import torch


def get_rng_state() -> dict:
    from megatron.core import tensor_parallel

    from megatron_tempnet.parallel import cpu

    tracker = tensor_parallel.get_cuda_rng_tracker()
    use_cuda = torch.cuda.is_available() and not cpu.is_active()
    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if use_cuda else None,
            "tracker": {k: v.clone() for k, v in tracker.get_states().items()}}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k: v.clone() for k, v in state["tracker"].items()})
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_sharded_object(ctx, state: dict | None):
    """This rank's RNG states as one shard of a (PP, TP, DP) grid of objects."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", state, (ctx.pp_size, ctx.tp_size, ctx.dp_size),
                         (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=0)

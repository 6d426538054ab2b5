"""Data parallelism: megatron-core DDP around a model stage."""
from __future__ import annotations


def wrap_ddp(model, *, use_distributed_optimizer: bool = False, grad_reduce_in_fp32: bool = True,
             overlap_grad_reduce: bool = False, bucket_size: int | None = None):
    """Wrap one model chunk in megatron-core DDP and hook its config into the schedules.

    Gradients land in ``param.main_grad``; ``finalize_model_grads`` (called by the schedule)
    reduces them over data-parallel ranks, syncs tied embeddings across pipeline stages, and
    divides by the global token count.
    """
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)

    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=bucket_size)
    wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = wrapped.no_sync
    return wrapped

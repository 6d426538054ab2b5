"""Data parallelism: megatron-core DDP around the model chunks of a stage."""
from __future__ import annotations

import contextlib


def wrap_ddp(model, *, use_distributed_optimizer: bool = False, grad_reduce_in_fp32: bool = True,
             overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
             bucket_size: int | None = None):
    """Wrap one model chunk in megatron-core DDP and hook its config into the schedules.

    Gradients land in ``param.main_grad``; ``finalize_model_grads`` (called by the schedule)
    reduces them over data-parallel ranks, syncs tied embeddings across pipeline stages, all-
    reduces the sequence-parallel norms' gradients over tensor-parallel ranks, and divides by
    the global token count.
    """
    return wrap_chunks([model], use_distributed_optimizer=use_distributed_optimizer,
                       grad_reduce_in_fp32=grad_reduce_in_fp32,
                       overlap_grad_reduce=overlap_grad_reduce,
                       overlap_param_gather=overlap_param_gather, bucket_size=bucket_size)[0]


def wrap_chunks(models: list, *, use_distributed_optimizer: bool = False,
                grad_reduce_in_fp32: bool = True, overlap_grad_reduce: bool = False,
                overlap_param_gather: bool = False, bucket_size: int | None = None) -> list:
    """Wrap every model chunk of this rank (one, or the interleaved pipeline's) in megatron-core
    DDP and hook them into the schedules as Megatron-LM's ``setup_model_and_optimizer`` does.

    ``overlap_grad_reduce``: the buckets' reductions start during the backward pass (the
    schedule calls ``grad_sync_func`` per chunk; ``finalize_model_grads`` waits for them).
    ``overlap_param_gather`` (with the distributed optimizer): the optimizer step leaves the
    all-gather of the updated weights to the next forward pass (a pre-hook per module waits for
    its bucket); before reading the weights outside a forward pass (a checkpoint, the HF
    export) use :func:`params_synced`. ``bucket_size``: parameters per bucket (None: megatron-
    core's default); chunks after the first are not bucketed with overlap (as Megatron-LM)."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)

    config = models[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=bucket_size)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                       disable_bucketing=i > 0 and overlap_grad_reduce)
               for i, model in enumerate(models)]

    def per_chunk(name: str):
        funcs = [getattr(chunk, name) for chunk in wrapped]
        return funcs[0] if len(funcs) == 1 else funcs

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = per_chunk("no_sync")
    if overlap_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if overlap_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")
    return wrapped


def ddp_options(parallel_cfg) -> dict:
    """:func:`wrap_chunks`' options of a run's ParallelConfig."""
    return dict(use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
                overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
                overlap_param_gather=parallel_cfg.overlap_param_gather,
                bucket_size=parallel_cfg.ddp_bucket_size)


@contextlib.contextmanager
def params_synced(chunks: list):
    """With ``overlap_param_gather`` the weights of an optimizer step arrive during the next
    forward pass; inside this block they are all here (gathered now, the forward pre-hooks off:
    Megatron-LM does the same around a checkpoint save and an evaluation). A no-op otherwise."""
    overlapped = [c for c in chunks if getattr(getattr(c, "ddp_config", None),
                                                "overlap_param_gather", False)]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()

"""One forward/backward over the micro-batches of a global batch, through megatron-core's schedules.

Batches are dicts with ``tokens``, ``labels``, ``position_ids`` ([b, s] int64) and ``loss_mask``
([b, s] float). The loss is the loss-mask weighted token mean over the whole global batch:
each micro-batch returns its loss *sum* and token count, and megatron-core's
``finalize_model_grads`` divides the gradients by the global token count.
"""
from __future__ import annotations

from functools import partial

import torch


def masked_sum_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron-core loss_func contract: (loss sum, token count, values to report)."""
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return total, num_tokens, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    """megatron-core forward_step_func: the model returns per-token losses [b, s]."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(masked_sum_loss, batch["loss_mask"])


def forward_backward(model_chunks: list, data_iterator, *, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool = False):
    """Run the pipeline schedule; returns the last stage's per-micro-batch reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    schedule = get_forward_backward_func()
    return schedule(forward_step_func=forward_step, data_iterator=data_iterator,
                    model=model_chunks, num_microbatches=num_microbatches,
                    seq_length=seq_length, micro_batch_size=micro_batch_size,
                    forward_only=forward_only)


def reduce_reports(reports: list, key: str = "lm loss") -> torch.Tensor:
    """[sum, count] summed over micro-batches (of this data-parallel rank)."""
    return torch.stack([r[key] for r in reports]).sum(0) if reports else torch.zeros(2)

"""Entry point: ``torchrun --nproc_per_node N -m megatron_tempnet.train --model tiny-llama ...``.

Builds, in order: process groups -> tokenizer -> datasets -> model stage -> DDP -> optimizer ->
scheduler, then runs the train loop (megatron_tempnet/training/loop.py).
"""
from __future__ import annotations

import sys

from megatron_tempnet.arguments import RunConfig, parse_args
from megatron_tempnet.data.datasets import build_datasets, build_micro_batch_iterator
from megatron_tempnet.data.tokenizers import load_tokenizer
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
from megatron_tempnet.parallel import initialize, shutdown
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.loop import train
from megatron_tempnet.training.optim import build_optimizer, build_scheduler, precision_dtype


def main(argv=None) -> int:
    run: RunConfig = parse_args(argv)
    par, tr = run.parallel.validate(), run.train
    ctx = initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, tr.seed)
    tr.validate(ctx.dp_size)

    tokenizer = load_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model)
    run.model.vocab_size = tokenizer.vocab_size
    train_ds, _, _ = build_datasets(run.data, tokenizer, seq_length=tr.seq_length, seed=tr.seed,
                                    train_samples=tr.train_iters * tr.global_batch_size)
    batches = build_micro_batch_iterator(train_ds, tr.micro_batch_size, tr.global_batch_size,
                                         ctx.dp_rank, ctx.dp_size,
                                         num_workers=run.data.num_workers)

    model = build_tempnet_model(run.model, run.tempnet, ctx,
                                params_dtype=precision_dtype(tr.precision), seed=tr.seed)
    if ctx.rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"model {run.model.family}: {n:,} parameters on this stage "
              f"(TP={ctx.tp_size} PP={ctx.pp_size} DP={ctx.dp_size}), loss "
              f"{run.tempnet.loss_mode}, mode {run.tempnet.training_mode}", flush=True)
    chunks = [wrap_ddp(model, use_distributed_optimizer=par.use_distributed_optimizer)]
    optimizer = build_optimizer(chunks, tr, use_distributed_optimizer=par.use_distributed_optimizer,
                                tempnet_cfg=run.tempnet)
    scheduler = build_scheduler(optimizer, tr)
    train(chunks, optimizer, scheduler, batches, tr, ctx,
          log=lambda line: print(line, flush=True))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

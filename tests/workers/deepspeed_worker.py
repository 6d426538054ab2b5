"""torchrun worker: DeepSpeed ZeRO-1/2 against the megatron-core DDP path, a few training steps.

Per layout (DP=2 with ZeRO-1 and ZeRO-2; TP=2 through the mpu adapter), on tiny-llama with
TempNet (loss mode tempnet_dro, so the optimizer has TempNet's own constant-lr group):
1. megatron-core path: build_tempnet_model -> wrap_ddp -> build_optimizer (distributed) ->
   Scheduler; STEPS steps through the schedules (training/step.py);
2. DeepSpeed path: a second model with the first one's initial weights -> build_deepspeed_engine
   (configs/deepspeed/zero{1,2}.json, torch AdamW with the same groups) -> the same Scheduler;
   the same STEPS global batches through deepspeed_train_step.
Saves, per layout and path, the global metrics and grad norm of every step.
"""
import sys

import torch

from megatron_tempnet.config import TrainConfig, load_model_preset
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
from megatron_tempnet.parallel import initialize, shutdown
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.deepspeed import build_deepspeed_engine, deepspeed_train_step
from megatron_tempnet.training.optim import build_optimizer, build_scheduler
from megatron_tempnet.training.step import forward_backward, global_metrics
from torchrun import REPO, save_rank_result

STEPS, SEQ = 4, 16
TRAIN = dict(micro_batch_size=2, global_batch_size=8, seq_length=SEQ, train_iters=STEPS,
             lr=2e-3, min_lr=2e-4, weight_decay=0.1, clip_grad=1.0, lr_warmup_iters=1)
TEMPNET = TempNetConfig(loss_mode="tempnet_dro", dropout=0.0, hidden_size=32, lr=1e-3,
                        weight_decay=0.01, rho=4.0)


def global_batches(vocab: int, train: TrainConfig):
    """The same global batches on every rank (random masks: ranks hold different token counts)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab, (train.global_batch_size, SEQ), generator=g)
        mask = (torch.rand(train.global_batch_size, SEQ, generator=g) > 0.3).float()
        yield {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
               "position_ids": torch.arange(SEQ).expand(train.global_batch_size, SEQ).contiguous()}


def rank_micro_batches(vocab, train, ctx):
    """This data-parallel rank's micro-batches, step after step."""
    per_rank = train.global_batch_size // ctx.dp_size
    for batch in global_batches(vocab, train):
        rows = {k: v[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank] for k, v in batch.items()}
        for i in range(0, per_rank, train.micro_batch_size):
            yield {k: v[i:i + train.micro_batch_size] for k, v in rows.items()}


def as_floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def run_layout(tp: int, zero_stage: int) -> dict:
    ctx = initialize(tp=tp, pp=1, seed=11)
    cfg = load_model_preset("tiny-llama", vocab_size=256)
    train = TrainConfig(**TRAIN).validate(ctx.dp_size)
    num_micro = train.num_microbatches(ctx.dp_size)

    # 1. megatron-core DDP + distributed optimizer
    model = build_tempnet_model(cfg, TEMPNET, ctx, seed=3)
    initial = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    chunks = [wrap_ddp(model, use_distributed_optimizer=True)]
    optimizer = build_optimizer(chunks, train, use_distributed_optimizer=True,
                                tempnet_cfg=TEMPNET)
    scheduler = build_scheduler(optimizer, train)
    batches = rank_micro_batches(cfg.vocab_size, train, ctx)
    mcore = []
    for _ in range(STEPS):
        chunks[0].zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(chunks, batches, num_microbatches=num_micro, seq_length=SEQ,
                                   micro_batch_size=train.micro_batch_size)
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        mcore.append({**as_floats(global_metrics(reports, ctx.dp_group)), "grad norm": grad_norm,
                      "lr": [g["lr"] for g in optimizer.param_groups]})

    # 2. DeepSpeed ZeRO on a fresh model with the same initial weights
    ds_model = build_tempnet_model(cfg, TEMPNET, ctx, seed=3)
    ds_model.load_state_dict(initial, strict=False)
    engine, ds_scheduler = build_deepspeed_engine(
        ds_model, train, ctx, REPO / "configs" / "deepspeed" / f"zero{zero_stage}.json",
        tempnet_cfg=TEMPNET)
    batches = rank_micro_batches(cfg.vocab_size, train, ctx)
    deepspeed = []
    for _ in range(STEPS):
        out = deepspeed_train_step(engine, ds_scheduler, batches, num_micro)
        metrics = global_metrics(out.reports, ctx.dp_group)
        deepspeed.append({**as_floats(metrics), "grad norm": out.grad_norm,
                          "lr": [g["lr"] for g in engine.optimizer.param_groups]})
    num_groups = len(engine.optimizer.param_groups)
    # the updated weights of both paths (DeepSpeed's module holds views of ZeRO's updated
    # buffers), and how far training moved them
    final = dict(model.named_parameters())
    weight_diff = max((p - final[n]).abs().max().item() for n, p in ds_model.named_parameters())
    moved = max((final[n] - initial[n]).abs().max().item() for n in final)
    return {"mcore": mcore, "deepspeed": deepspeed, "num_groups": num_groups,
            "weight_diff": weight_diff, "moved": moved,
            "ds_stage": engine.zero_optimization_stage(), "tp_rank": ctx.tp_rank,
            "dp_rank": ctx.dp_rank}


def main():
    results = {}
    for tp, stage in [(1, 1), (1, 2), (2, 1)]:  # 2 processes: DP=2 ZeRO-1/2, TP=2 ZeRO-1
        results[(tp, stage)] = run_layout(tp, stage)
    save_rank_result(results)
    shutdown()


if __name__ == "__main__":
    main()
    sys.exit(0)

"""torchrun worker (2 processes), two modes:

``deepspeed_worker.py`` (parity): DeepSpeed ZeRO-1/2 against the megatron-core DDP path, a few
training steps. Per layout (DP=2 with ZeRO-1 and ZeRO-2; TP=2 through the mpu adapter), on
tiny-llama with TempNet (loss mode tempnet_dro, so the optimizer has TempNet's own constant-lr
group):
1. megatron-core path: build_tempnet_model -> wrap_ddp -> build_optimizer (distributed) ->
   Scheduler; STEPS steps through the schedules (training/step.py);
2. DeepSpeed path: a second model with the first one's initial weights -> build_deepspeed_engine
   (configs/deepspeed/zero{1,2}.json, torch AdamW with the same groups) -> the same Scheduler;
   the same STEPS global batches through deepspeed_train_step.
Saves, per layout and path, the global metrics and grad norm of every step.

``deepspeed_worker.py checkpoint <data prefix> <tokenizer model> <work dir>``: checkpoints
under --deepspeed through the real entry point (train.build), DP=2, TempNet on, dropout on, two
micro-batches per step:
  A   ZeRO-1, 4 iterations, --save-interval 2 --keep-last 1               (reference)
  B1  same flags, SIGTERM to rank 0 only after iteration 1 -> stops at 2, saves, exit code 3
  B2  --load: iterations 3..4                       (A == B1 + B2 bitwise: losses, weights)
  N   --load B (at 4) --no-load-optim: iteration and lr schedule at 4, no optimizer state
  H   --load A --finetune into a plain-CE model: LM weights only, iteration 0
  F   --load B with --num-layers 2: a clear shape error before any tensor is read
  Z   ZeRO-2: 4 iterations with --save-interval 2, then --load Z/iter_0000002 + 2, bitwise
  T   TP=2 (DP=1), ZeRO-1, 2 iterations with --save; the plain and tempered CE of a fixed
      probe batch (hf_export_worker.probe_batch): what its Hugging Face export must give
"""
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tempnet.config import TrainConfig, load_model_preset
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model, loss_channels
from megatron_tempnet.parallel import initialize, shutdown
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.deepspeed import build_deepspeed_engine, deepspeed_train_step
from megatron_tempnet.training.optim import build_optimizer, build_scheduler
from megatron_tempnet.training.step import ReportSpec, forward_backward, global_metrics
from torchrun import REPO, save_rank_result

STEPS, SEQ = 4, 16
TRAIN = dict(micro_batch_size=2, global_batch_size=8, seq_length=SEQ, train_iters=STEPS,
             lr=2e-3, min_lr=2e-4, weight_decay=0.1, clip_grad=1.0, lr_warmup_iters=1)
TEMPNET = TempNetConfig(loss_mode="tempnet_dro", dropout=0.0, hidden_size=32, lr=1e-3,
                        weight_decay=0.01, rho=4.0)
SPEC = ReportSpec(loss_channels(TEMPNET))


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
                                   micro_batch_size=train.micro_batch_size, spec=SPEC)
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
        out = deepspeed_train_step(engine, ds_scheduler, batches, num_micro, spec=SPEC)
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


def parity_main():
    results = {}
    for tp, stage in [(1, 1), (1, 2), (2, 1)]:  # 2 processes: DP=2 ZeRO-1/2, TP=2 ZeRO-1
        results[(tp, stage)] = run_layout(tp, stage)
    save_rank_result(results)
    shutdown()


# --- checkpoint mode ---------------------------------------------------------------------------

def flags(data, tokenizer, *extra, zero=1, iters=4):
    return ["--model", "tiny-llama", "--data-path", data, "--tokenizer-model", tokenizer,
            "--split", "99,1,0", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr", "5e-3", "--min-lr", "5e-4",
            "--lr-warmup-iters", "1", "--log-interval", "1", "--hidden-dropout", "0.1",
            "--tempnet-loss-mode", "tempnet_dro", "--tempnet-hidden-size", "16",
            "--tempnet-rho", "4.0",
            "--tempnet-lr", "1e-3", "--train-iters", str(iters), "--eval-iters", "0",
            "--deepspeed",
            "--deepspeed_config", str(REPO / "configs" / "deepspeed" / f"zero{zero}.json"),
            *extra]


def weights(trainer):
    """The trained weights: DeepSpeed's module holds views of ZeRO's updated buffers."""
    return {n: p.detach().clone() for n, p in trainer.model_chunks[0].named_parameters()}


def sigterm_rank0_after(iteration):
    def callback(state, out):
        if state.iteration == iteration and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


def probe(model, spec) -> dict:
    """Forward-only plain CE (tau = 1) and tempered CE of the fixed probe batch."""
    from hf_export_worker import probe_batch

    from megatron_tempnet.training.step import reduce_reports

    batch = probe_batch()
    model.eval()
    reports = forward_backward([model], iter([batch]), num_microbatches=1,
                               seq_length=batch["tokens"].shape[1],
                               micro_batch_size=batch["tokens"].shape[0], forward_only=True,
                               spec=spec)
    return {k: (lambda v: (v[0] / v[1]).item())(reduce_reports(reports, k))
            for k in ("lm loss", "tempered ce")}


def checkpoint_main(data, tokenizer, work: Path):
    from megatron_tempnet import train as entry
    from megatron_tempnet.arguments import parse_args
    from megatron_tempnet.config import ConfigError
    from megatron_tempnet.training.checkpoint_layout import read_latest, saved_iterations

    def build(*extra, **kw):
        return entry.build(parse_args(flags(data, tokenizer, *extra, **kw)))

    a, b, z = (str(work / name) for name in ("a", "b", "z"))
    r = {}
    # A: the reference; keep-last 1 leaves only iter_0000004
    t = build("--save", a, "--save-interval", "2", "--keep-last", "1")
    r["A"], r["A_weights"] = t.train().history, weights(t)
    r["A_dirs"], r["A_latest"] = saved_iterations(a), read_latest(a)
    r["A_files"] = sorted(p.name for p in (Path(a) / "iter_0000004").iterdir())
    r["A_ds_latest"] = (Path(a) / "latest").exists()  # DeepSpeed's own marker: not written

    # B1: SIGTERM to rank 0 only after iteration 1 -> every rank stops after iteration 2
    t = build("--save", b, "--save-interval", "100")
    state = t.train(callbacks=[sigterm_rank0_after(1)])
    r["B1"], r["B1_exit"], r["B1_latest"] = state.history, state.exit_code, read_latest(b)

    # B2: resume -> iterations 3..4
    t = build("--save", b, "--load", b)
    r["B2_start"], r["B2_consumed"] = t.state.iteration, t.state_dict()["consumed_samples"]
    r["B2"], r["B2_weights"] = t.train().history, weights(t)

    # N: --no-load-optim (B is at 4): position and lr schedule restored, ZeRO state fresh
    t = build("--load", b, "--no-load-optim", iters=5)
    r["N"] = (t.state.iteration, t.scheduler.num_steps,
              len(t.checkpointer.engine.optimizer.optimizer.state))

    # H: --finetune from A's TempNet checkpoint into a plain-CE model: the LM weights only
    # (TempNet's tensors in the checkpoint are left out), iteration 0, and ZeRO's fp32 master
    # partitions refreshed from them (else the first step would restore the init)
    t = build("--load", a, "--finetune", "--tempnet-loss-mode", "ce")
    opt = t.checkpointer.engine.optimizer
    r["H_start"], r["H_weights"] = t.state.iteration, weights(t)
    r["H_fp32_synced"] = all(
        torch.equal(fp32, bit16[t.ctx.dp_rank]) for fp32, bit16 in
        zip(opt.single_partition_of_fp32_groups, opt.parallel_partitioned_bit16_groups))

    # F: another model shape
    try:
        build("--load", b, "--num-layers", "2")
        r["F_error"] = None
    except ConfigError as e:
        r["F_error"] = str(e)

    # Z: ZeRO-2, 4 iterations vs 2 + resume from the iter_* directory itself + 2
    t = build("--save", z, "--save-interval", "2", zero=2)
    r["Z_full"], r["Z_full_weights"] = t.train().history, weights(t)
    t = build("--load", str(Path(z) / "iter_0000002"), zero=2)
    r["Z_start"], r["Z_resumed"] = t.state.iteration, t.train().history
    r["Z_resumed_weights"] = weights(t)

    # T: a TP=2 DeepSpeed checkpoint (one module file per TP rank) and its probe losses
    t = build("--save", str(work / "t"), "--tensor-model-parallel-size", "2", iters=2)
    t.train()
    r["T_probe"] = probe(t.model_chunks[0], t.spec)
    r["work"] = str(work)
    save_rank_result(r)
    shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["checkpoint"]:
        checkpoint_main(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        parity_main()
    sys.exit(0)

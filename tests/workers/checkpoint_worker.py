"""torchrun worker (2 processes): checkpointing end to end through the real entry point.

One launch, several runs in this process (``train.build`` re-initializes the process groups);
the result keys are the run names (directories: a = reference, b = sigterm .. no_load_optim,
c = finetune_from_ce, p = pp2):
  reference          TP=2, 6 iterations, --save-interval 3 --keep-last 1
  sigterm            same flags, SIGTERM to rank 0 only after iteration 2 -> stops at 3, saves,
                     exit code 3
  resumed            --load: iterations 4..6   (reference == sigterm + resumed bitwise: losses,
                     weights)
  nan_loss           --load b at 6, NaN loss from iteration 7: TrainingDiverged, checkpoint 6
                     untouched
  killed_save        --load b at 6, the save of iteration 7 crashes after writing part of its
                     directory
  after_killed_save  --load b: resumes from 6 (latest still 6), saves 7 over the unfinished
                     directory
  other_shape        --load b with --num-layers 2: a clear shape error before any tensor is read
  no_load_optim      --load b (at 7) --no-load-optim: iteration 7, scheduler at step 7, no
                     optimizer state
  tp1_resume         TP=1 (DP=2) --load a: model + optimizer resharded; same probe-batch loss as
                     the reference; 1 more step
  finetune_from_ce   plain-CE checkpoint -> --finetune into a TempNet model: LM loaded, TempNet at
                     its init
  pp2                PP=2: 4 iterations vs 2 + resume from iter_0000002 + 2, bitwise
  time_limit         train.main() with --exit-duration-in-mins: saves, returns
                     EXIT_CODE_TIME_LIMIT
Usage: checkpoint_worker.py <data prefix> <tokenizer model> <work dir>
"""
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tempnet import train as entry
from megatron_tempnet.arguments import parse_args
from megatron_tempnet.config import ConfigError
from megatron_tempnet.training import checkpointing, step
from megatron_tempnet.training.checkpoint_layout import read_latest, saved_iterations
from megatron_tempnet.training.run_control import TrainingDiverged
from megatron_tempnet.training.step import forward_backward, reduce_reports
from torchrun import save_rank_result

DATA, TOKENIZER, WORK = sys.argv[1], sys.argv[2], Path(sys.argv[3])


def flags(*extra, tp=2, pp=1, iters=6, loss_mode="tempnet_dro"):
    return ["--model", "tiny-llama", "--data-path", DATA, "--tokenizer-model", TOKENIZER,
            "--split", "99,1,0", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "5e-3", "--min-lr", "5e-4",
            "--lr-warmup-iters", str(min(1, iters - 1)), "--log-interval", "1",
            "--hidden-dropout", "0.1",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--tempnet-loss-mode", loss_mode, "--tempnet-hidden-size", "16", "--tempnet-rho", "4.0",
            "--tempnet-lr", "1e-3", "--train-iters", str(iters), *extra]


def build(*extra, **kw):
    return entry.build(parse_args(flags(*extra, **kw)))


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model_chunks[0].module.named_parameters()}


def probe_loss(trainer):
    """Plain CE and DRO loss of a fixed batch, forward only, dropout off (last stage)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 400, (2, 33), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32),
             "position_ids": torch.arange(32).expand(2, 32).contiguous()}
    model = trainer.model_chunks[0].module
    model.eval()
    reports = forward_backward(trainer.model_chunks, iter([batch]), num_microbatches=1,
                               seq_length=32, micro_batch_size=2, forward_only=True,
                               spec=trainer.spec)
    model.train()
    if not reports:
        return None
    return {k: (lambda v: (v[0] / v[1]).item())(reduce_reports(reports, k))
            for k in ("lm loss", "dro loss")}


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
        h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


def sigterm_rank0_after(iteration):
    def callback(state, out):
        if state.iteration == iteration and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


START = time.perf_counter()
# a resume that trains longer than the checkpoint's --train-iters: its lr schedule continues
KEEP_SCHEDULE = "--use-checkpoint-opt-param-scheduler"


def mark(phase):
    """Phase timings on stderr (rank 0): they show in the launching test's log on failure."""
    if dist.is_initialized() and dist.get_rank() == 0:
        print(f"[checkpoint_worker] {phase} at {time.perf_counter() - START:.1f} s",
              file=sys.stderr)


def main():
    a, b, c, p = (str(WORK / name) for name in ("a", "b", "c", "p"))
    r = {}

    # reference: keep-last 1 leaves only iter_0000006
    t = build("--save", a, "--save-interval", "3", "--keep-last", "1")
    r["reference"] = t.train().history
    r["reference_weights"], r["reference_probe"] = weights(t), probe_loss(t)
    r["reference_dirs"], r["reference_latest"] = saved_iterations(a), read_latest(a)

    # sigterm: SIGTERM to rank 0 only after iteration 2 -> every rank stops after iteration 3
    t = build("--save", b, "--save-interval", "100")
    state = t.train(callbacks=[sigterm_rank0_after(2)])
    r["sigterm"], r["sigterm_exit"] = state.history, state.exit_code
    r["sigterm_latest"] = read_latest(b)
    r["handler_restored"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    # resumed: resume -> iterations 4..6
    t = build("--save", b, "--load", b, "--save-interval", "3")
    r["resumed_start"] = t.state.iteration
    r["resumed"] = t.train().history
    r["resumed_weights"] = weights(t)

    mark("nan_loss")
    # nan_loss: NaN loss from iteration 7 on (checkpoint 6 must stay current and untouched)
    digest = tree_digest(Path(b) / "iter_0000006")
    real_loss = step.masked_sum_loss
    step.masked_sum_loss = lambda mask, output, **kw: real_loss(mask, output * float("nan"), **kw)
    try:
        build("--save", b, "--load", b, KEEP_SCHEDULE, "--save-interval", "1", iters=8).train()
        r["nan_loss_error"] = None
    except TrainingDiverged as e:
        r["nan_loss_error"] = str(e)
    finally:
        step.masked_sum_loss = real_loss
    dist.barrier()
    r["nan_loss_untouched"] = digest == tree_digest(Path(b) / "iter_0000006")
    r["nan_loss_latest"], r["nan_loss_dirs"] = read_latest(b), saved_iterations(b)

    mark("killed_save")
    # killed_save: the save of iteration 7 dies after writing its shards, before metadata.json
    # and the
    # marker (what a kill in the middle of a save leaves)
    real_save = checkpointing.save_sharded

    def crashing_save(state_dict, path):
        real_save(state_dict, path)
        dist.barrier()
        if dist.get_rank() == 0:
            (path / "metadata.json").unlink()
        raise RuntimeError("injected crash during save")

    checkpointing.save_sharded = crashing_save
    try:
        build("--save", b, "--load", b, KEEP_SCHEDULE, "--save-interval", "1", iters=7).train()
        r["killed_save_error"] = None
    except RuntimeError as e:
        r["killed_save_error"] = str(e)
    finally:
        checkpointing.save_sharded = real_save
    dist.barrier()
    r["killed_save_latest"], r["killed_save_dirs"] = read_latest(b), saved_iterations(b)

    mark("after_killed_save")
    # after_killed_save: resume from 6 again; the unfinished iter_0000007 is replaced by a
    # complete one
    t = build("--save", b, "--load", b, KEEP_SCHEDULE, "--save-interval", "1", iters=7)
    r["after_killed_save_start"], r["after_killed_save"] = t.state.iteration, t.train().history
    r["after_killed_save_latest"] = read_latest(b)

    mark("other_shape")
    # other_shape: another model shape
    try:
        build("--load", b, "--num-layers", "2")
        r["other_shape_error"] = None
    except ConfigError as e:
        r["other_shape_error"] = str(e)

    # no_load_optim: (b is at 7 now): position restored, fresh optimizer, lr schedule at 7
    t = build("--load", b, "--no-load-optim", iters=8)
    r["no_load_optim"] = (t.state.iteration, t.scheduler.num_steps,
              sum(len(o.optimizer.state) for o in t.optimizer.chained_optimizers))

    mark("tp1_resume")
    # tp1_resume: TP=1 (DP=2) resumes the reference's TP=2 checkpoint (model + optimizer
    # resharded), trains on
    t = build("--load", a, KEEP_SCHEDULE, tp=1, iters=7)
    r["tp1_resume_start"], r["tp1_resume_probe"] = t.state.iteration, probe_loss(t)
    r["tp1_resume_more"] = t.train().history

    mark("finetune_from_ce")
    # finetune_from_ce: a plain-CE checkpoint, then --finetune into a TempNet model
    t = build("--save", c, loss_mode="ce", iters=1)
    t.train()
    ce_weights = weights(t)
    fresh = weights(build(iters=1))
    t = build("--load", c, "--finetune", iters=1)
    loaded = weights(t)
    r["finetune_from_ce_start"] = t.state.iteration
    r["finetune_from_ce_lm_loaded"] = all(torch.equal(loaded[n], w) for n, w in ce_weights.items())
    r["finetune_from_ce_tempnet_init"] = [n for n in loaded if n.startswith("tempnet.")] and all(
        torch.equal(loaded[n], fresh[n]) for n in loaded if n.startswith("tempnet."))
    r["finetune_from_ce_history"] = t.train().history

    mark("pp2")
    # pp2: PP=2, bitwise: 4 iterations vs 2 + resume + 2
    t = build("--save", p, "--save-interval", "2", tp=1, pp=2, iters=4)
    r["pp2_full"], r["pp2_full_weights"] = t.train().history, weights(t)
    t = build("--load", str(Path(p) / "iter_0000002"), tp=1, pp=2, iters=4)
    r["pp2_start"] = t.state.iteration
    r["pp2_resumed"], r["pp2_resumed_weights"] = t.train().history, \
        weights(t)

    mark("time_limit")
    # time_limit: the entry point's exit code (main() shuts the process groups down)
    r["time_limit_exit"] = entry.main(flags("--save", str(WORK / "m"), "--exit-duration-in-mins",
                                   "1e-6", iters=6))
    r["time_limit_latest"] = read_latest(WORK / "m")
    mark("end")
    save_rank_result(r)


if __name__ == "__main__":
    main()

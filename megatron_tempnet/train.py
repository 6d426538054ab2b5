"""Entry point: ``torchrun --nproc_per_node N -m megatron_tempnet.train --model tiny-llama ...``.

Builds, in order: tokenizer -> every config check (arguments.resolve) -> process groups ->
datasets -> model stage -> DDP -> optimizer ->
scheduler -> checkpoint (--load) -> data position, then runs the train loop
(megatron_tempnet/training/loop.py). Exit codes: 0 done; 2 a bad input (one line, cli.py);
run_control.EXIT_CODE_PREEMPTED (3, SIGTERM/SIGUSR1, also during start-up) and
EXIT_CODE_TIME_LIMIT (4, --exit-duration-in-mins) after saving a checkpoint; EXIT_CODE_DIVERGED
(5) on a non-finite loss / grad norm, a loss spike or a collapse to ln V, nothing saved. Rank 0
also writes them to <--save>/exit_status.json (torchrun reports every failure as 1).
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a SIGTERM while they run is recorded
    from megatron_tempnet.cli import EarlySignals

    EarlySignals.install()

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path


from megatron_tempnet.arguments import RunConfig, parse_args
from megatron_tempnet.cli import error_line, process_rank, run_command, write_exit_status
from megatron_tempnet.data.datasets import (build_datasets, build_micro_batch_iterator,
                                            num_samples)
from megatron_tempnet.parallel import ParallelContext, shutdown
from megatron_tempnet.training.checkpoint_layout import read_latest
from megatron_tempnet.training.checkpointing import Checkpointer
from megatron_tempnet.training.run_control import (EXIT_CODE_DIVERGED, EXIT_CODE_PREEMPTED,
                                                   EXIT_CODE_TIME_LIMIT, RunControl,
                                                   TrainingDiverged)
from megatron_tempnet.training.run_record import run_record
from megatron_tempnet.training.ddp import ddp_options, wrap_chunks
from megatron_tempnet.training.evaluate import EvalCallback
from megatron_tempnet.training.flops import flops_per_token, peak_flops
from megatron_tempnet.training.loop import TrainLoop, TrainState
from megatron_tempnet.training.metrics_log import (MetricsCallback, MetricsLogger, Throughput,
                                                   format_duration, is_writer_rank)
from megatron_tempnet.training.optim import build_optimizer, build_scheduler
from megatron_tempnet.training.save_dir import acquire_lock, continues
from megatron_tempnet.training.reports import ReportSpec
from megatron_tempnet.training.stage import build_stage, report_spec, start
from megatron_tempnet.training.step import megatron_step


def log(line: str) -> None:
    print(line, flush=True)


@dataclass(kw_only=True)
class Trainer(TrainLoop):
    """The train loop (training/loop.py: step, data, state, checkpointer, run control,
    callbacks) with what :func:`build` built it from (tests and hooks reach in here)."""

    run: RunConfig
    model_chunks: list
    optimizer: object
    scheduler: object
    logger: MetricsLogger  # TensorBoard / JSONL sinks (a no-op but on the writer rank)

    def train(self, callbacks=()) -> TrainState:
        """The train loop, then a summary; a signal received during start-up stops before the
        first iteration (exit code 3: the loaded checkpoint, if any, stays current)."""
        start, t0 = self.state.iteration, time.perf_counter()
        try:
            with self.control:
                stop = self.control.stop_before_training()
                if stop is not None:
                    self.state.exit_code, self.state.stop_reason = stop.exit_code, stop.message
                    if self.ctx.rank == 0:
                        log(stop.message)
                    return self.state
            if start >= self.train_cfg.train_iters and self.ctx.rank == 0:
                log(f"the checkpoint is at iteration {start}, --train-iters is "
                    f"{self.train_cfg.train_iters}: nothing to train (raise --train-iters to "
                    "continue)")
            state = super().train(callbacks)
            if is_writer_rank(self.ctx):
                log(run_summary(self.run, self.spec, state, start, time.perf_counter() - t0))
            return state
        finally:
            self.logger.close()
            if self.checkpointer is not None:
                self.checkpointer.close()


def run_summary(run: RunConfig, spec: ReportSpec, state: TrainState, start: int,
                seconds: float) -> str:
    """The last line of a run: iterations and tokens of this job, time, final losses, where the
    checkpoints and metrics are."""
    tr, ck, lg = run.train, run.checkpoint, run.logging
    done = state.iteration - start
    last = state.metrics[-1][1] if state.metrics else {}
    # "k = v": the log lines' "lm loss v" stays per iteration
    losses = ", ".join(f"{k} = {last[k]:.4f}" for k in spec.losses if k in last)
    where = [f"checkpoints {ck.save} (latest {read_latest(ck.save)})" if ck.save else
             "no checkpoints (--save not given)"]
    where += [f"TensorBoard {lg.tensorboard_dir}"] * bool(lg.tensorboard_dir)
    where += [f"metrics {lg.metrics_jsonl}"] * bool(lg.metrics_jsonl)
    return (f"summary: iterations {start}..{state.iteration} of {tr.train_iters} ({done} in this "
            f"job, {done * tr.global_batch_size * tr.seq_length:,} tokens, "
            f"{format_duration(seconds)})" + (f"; final {losses}" if losses else "")
            + (f"; stopped: {state.stop_reason}" if state.stop_reason else "")
            + "; " + ", ".join(where))


def config_lines(run: RunConfig) -> list[str]:
    """The resolved configuration, one line per section (printed once at start)."""
    return [f"  {name}: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(section).items())
            for name, section in vars(run).items()]


def build(run: RunConfig, start_time: float | None = None,
          control: RunControl | None = None) -> Trainer:
    """Process groups (re)initialized in this process, data, model, optimizer, and --load.
    ``control``: the run control whose signal handlers are already installed (train.py's
    command enters it before start-up, so that a SIGTERM during --load is honoured)."""
    par, tr, ck, ev, ds = run.parallel, run.train, run.checkpoint, run.eval, run.deepspeed
    ctx, tokenizer = start(run)  # every config check before process groups and data
    if ctx.rank == 0:
        log("\n".join(["resolved configuration (preset, --config, flags):", *config_lines(run)]))
    n_train, n_valid, _ = num_samples(tr.train_iters, tr.global_batch_size, ev.eval_iters,
                                      ev.eval_interval or None)
    train_ds, valid_ds, _ = build_datasets(run.data, tokenizer, seq_length=tr.seq_length,
                                           seed=tr.seed, train_samples=n_train,
                                           valid_samples=n_valid)
    batches, valid_batches = (
        build_micro_batch_iterator(d, tr.micro_batch_size, tr.global_batch_size, ctx.dp_rank,
                                   ctx.dp_size, num_workers=run.data.num_workers,
                                   vocab_size=tokenizer.vocab_size)
        for d in (train_ds, valid_ds))

    models, spec = build_stage(run, ctx), report_spec(run)
    if ctx.rank == 0:
        n = sum(p.numel() for model in models for p in model.parameters())
        vp = f" VP={par.virtual_size}" if par.virtual_size > 1 else ""
        log(f"model {run.model.family}: {n:,} parameters on this stage "
            f"(TP={ctx.tp_size} PP={ctx.pp_size}{vp} DP={ctx.dp_size}"
            f"{' SP' if par.sequence_parallel else ''}), loss "
            f"{run.tempnet.loss_mode}, mode {run.tempnet.training_mode}")
    if ds.deepspeed:
        chunks, optimizer, scheduler, step, checkpointer = _deepspeed(run, models[0], ctx, spec)
    else:
        chunks = wrap_chunks(models, **ddp_options(par))
        optimizer = build_optimizer(chunks, tr, tempnet_cfg=run.tempnet,
                                    use_distributed_optimizer=par.use_distributed_optimizer)
        scheduler = build_scheduler(optimizer, tr)
        step = megatron_step(chunks, optimizer, scheduler, tr, spec)
        checkpointer = Checkpointer(ck, chunks, optimizer, scheduler, ctx,
                                    run_record(run.model, run.tempnet, tr, ctx), log=log)
    if control is None:
        control = RunControl(ck, start_time=start_time)
    control.bind(ctx.device, tokenizer.vocab_size, spec.losses)
    logger, throughput, callbacks = _sinks(run, chunks, valid_batches, ctx, spec)
    trainer = Trainer(step=step, batches=batches, train_cfg=tr, ctx=ctx,
                      checkpointer=checkpointer, control=control, callbacks=callbacks, spec=spec,
                      throughput=throughput, log=log, run=run, model_chunks=chunks,
                      optimizer=optimizer, scheduler=scheduler, logger=logger)
    trainer.restore()  # --load: the model, optimizer, ... and the trainer's own state
    if trainer.state.iteration == 0 and not ds.deepspeed:  # a fresh frozen_lm run: TempNet's
        calibrate_initial_tau(run, chunks, optimizer, ctx, lambda: build_micro_batch_iterator(
            train_ds, tr.micro_batch_size, tr.global_batch_size, ctx.dp_rank, ctx.dp_size))
    return trainer


def calibrate_initial_tau(run: RunConfig, chunks: list, optimizer, ctx: ParallelContext,
                          training_batches) -> float | None:
    """--tempnet-arch scale_aware with --tempnet-training-mode frozen_lm and no --tempnet-tau0:
    start TempNet at the frozen LM's best single global temperature, measured (training/
    evaluate.py's grid search) on the first ``--eval-iters`` global batches of the TRAINING
    split (never the validation split), so that TempNet learns per-token corrections to the
    best constant. Only a head still at its init (not loaded from a checkpoint) is moved; the
    optimizer's main parameters are reloaded from the model. ``training_batches()``: a fresh
    iterator over this DP rank's training micro-batches from the first sample (the run's own
    iterator is not touched). Returns the tau set (or None)."""
    from megatron_tempnet.tempnet.head import ScaleAwareTempNetHead, start_at_tau
    from megatron_tempnet.training.evaluate import evaluate, unwrap_model

    cfg, tr = run.tempnet, run.train
    head = getattr(unwrap_model(chunks[-1]), "tempnet", None)
    if not (cfg.training_mode == "frozen_lm" and cfg.tau0 is None
            and isinstance(head, ScaleAwareTempNetHead)):
        return None
    if head.w_out.count_nonzero() or head.w_out_feat.count_nonzero() or float(head.b_out):
        return None  # TempNet came from the checkpoint
    n = run.eval.eval_iters or 10
    metrics = evaluate(chunks, iter(training_batches()), n, ctx, seq_length=tr.seq_length,
                       micro_batch_size=tr.micro_batch_size,
                       num_microbatches=tr.num_microbatches(ctx.dp_size), config=run.eval,
                       spec=report_spec(run))
    tau = start_at_tau(head, metrics["best T"])
    optimizer.reload_model_params()  # main (fp32 / sharded) copies follow the model
    if ctx.rank == 0:
        log(f"TempNet starts at tau {tau:.4f}: the frozen LM's best global temperature on the "
            f"first {n} training batches (ppl {metrics['ppl tau=1']:.3f} at tau 1, "
            f"{metrics['ppl best T']:.3f} at T {metrics['best T']:.4f}); --tempnet-tau0 sets "
            "it by hand")
    return tau


def _sinks(run: RunConfig, chunks: list, valid_batches, ctx: ParallelContext,
           spec: ReportSpec):
    """(the metrics logger, the throughput constants, the callbacks: the logger's sink and
    periodic evaluation on the validation split). The resolved configuration goes to the
    sinks as the run's hyperparameters."""
    tr = run.train
    logger = MetricsLogger(run.logging, ctx)
    logger.log_config({**dataclasses.asdict(run), "parameters on this stage": sum(
        p.numel() for chunk in chunks for p in chunk.parameters())})
    tempnet_hidden = run.tempnet.hidden_size if run.tempnet.uses_tempnet else None
    throughput = Throughput(
        flops_per_token=flops_per_token(run.model, tr.seq_length,
                                        vocab_size=run.model.padded_vocab_size(ctx.tp_size),
                                        tempnet_hidden=tempnet_hidden),
        peak=peak_flops(ctx.device, tr.precision, run.logging.peak_tflops))
    callbacks = [MetricsCallback(logger)]
    if valid_batches is not None and run.eval.eval_iters > 0:
        callbacks.append(EvalCallback(chunks, valid_batches, ctx, run.eval, tr, spec,
                                      logger=logger, log=log))
    return logger, throughput, callbacks


def _deepspeed(run: RunConfig, model, ctx: ParallelContext, spec: ReportSpec):
    """The DeepSpeed engine path (ZeRO 1/2): its step replaces the megatron-core step, its
    checkpointer (DeepSpeed's own format, our marker and run control) the megatron-core one."""
    from functools import partial

    from megatron_tempnet.training.deepspeed import (DeepSpeedCheckpointer,
                                                     build_deepspeed_engine, deepspeed_train_step)

    engine, scheduler = build_deepspeed_engine(model, run.train, ctx,
                                               run.deepspeed.deepspeed_config,
                                               tempnet_cfg=run.tempnet)
    checkpointer = DeepSpeedCheckpointer(run.checkpoint, engine, scheduler, ctx,
                                         run_record(run.model, run.tempnet, run.train, ctx),
                                         log=log)
    return ([engine.module], engine.optimizer, scheduler,
            partial(deepspeed_train_step, engine, scheduler, spec=spec),
            checkpointer)


EXIT_REASONS = {0: "done", EXIT_CODE_PREEMPTED: "preempted", EXIT_CODE_TIME_LIMIT: "time limit",
                EXIT_CODE_DIVERGED: "diverged"}


def _main(argv, status: dict) -> int:
    """Parse, lock --save, build (--load; the run claims --save: save_dir.py), train. Rank 0
    records the run in <--save>/exit_status.json (``status["dir"]``: "running", then the
    outcome) from the start when --save is new or this run continues it (--load inside it),
    else once the run has claimed it: a run refused as another run's never writes there."""
    start_time = time.time()
    run = parse_args(argv)
    save, rank0 = run.checkpoint.save, process_rank() == 0

    def record_start():
        if save and rank0 and "dir" not in status:
            status["dir"] = save
            write_exit_status(save, None, "running", "started", None)

    if save and rank0:
        if not run.checkpoint.no_save_lock:
            acquire_lock(Path(save))  # another run writing there: one line, nothing written
        if continues(Path(save), run.checkpoint.load):
            record_start()
    control = RunControl(run.checkpoint, start_time=start_time)
    state = None
    with control:  # a SIGTERM from here on stops the run once that is safe
        try:
            trainer = build(run, start_time, control)
            record_start()
            state = trainer.train()
            code, message = state.exit_code, state.stop_reason or "finished"
        except TrainingDiverged as e:  # every rank raises it (RunControl's all-reduce)
            latest = read_latest(save) if save else None
            message = f"{e}; " + (f"the last checkpoint, iteration {latest} in {save}, is "
                                  "untouched" if latest is not None else "no checkpoint was saved")
            if e.since is not None and latest is not None and latest >= e.since:
                message += (f" (but it is past the collapse at iteration {e.since}: resume from "
                            "an earlier one with --load " + f"{save}/iter_<N>)")
            if rank0:
                log(message)
            code = EXIT_CODE_DIVERGED
        except Exception as e:
            if status.get("dir") and error_line(e) is None:  # a bug: keep the traceback
                write_exit_status(status["dir"], 1, "crashed", f"{type(e).__name__}: {e}")
            raise
    if status.get("dir"):
        write_exit_status(status["dir"], code, EXIT_REASONS.get(code, "stopped"), message,
                          state.iteration if state is not None else read_latest(save))
    shutdown()
    return code


def main(argv=None) -> int:
    """The command: :func:`_main`; a bad input ends as one line and exit code 2 (cli.py),
    recorded in <--save>/exit_status.json when this run holds --save."""
    status: dict = {}
    return run_command(lambda args: _main(args, status), argv,
                       status_dir=lambda: status.get("dir"))


if __name__ == "__main__":
    sys.exit(main())

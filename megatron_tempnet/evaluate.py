"""Evaluate a model: ``[torchrun --nproc_per_node N] -m megatron_tempnet.evaluate --load CKPT ...``.

Takes the training flags (``megatron_tempnet.arguments``: the same --model / --config / model,
parallel, data and tempnet flags as the run that saved CKPT) plus the evaluation flags of
:class:`~megatron_tempnet.training.config.EvalConfig` (--eval-iters, --temperature-min, ...,
unless the training flags already have them) and:

    --eval-split {valid,test}  which split of --data-path / --split to evaluate (default valid)
    --metrics-jsonl PATH       also append the metrics as one JSON line

Builds: process groups -> tokenizer -> the split's dataset -> model stage -> weights from
``--load`` (model only: no optimizer, scheduler or RNG; without --load the model is evaluated as
initialised, with a warning) -> ``training.evaluate.evaluate`` over ``--eval-iters`` global
batches of ``--global-batch-size`` sequences. Rank 0 prints the table: rows tau = 1, TempNet's
tau (or the fixed tau), the best global T; columns perplexity and ECE (docs/tempnet_math.md 5).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_tempnet.config import ConfigError
from megatron_tempnet.training.config import EvalConfig
from megatron_tempnet.training.evaluate import format_eval_table

SPLITS = ("valid", "test")


def _eval_parser(known_flags) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    parser.add_argument("--eval-split", dest="split_name", choices=SPLITS)
    parser.add_argument("--metrics-jsonl", dest="metrics_jsonl")
    for f in dataclasses.fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        if flag not in known_flags:
            parser.add_argument(flag, dest=f"eval.{f.name}", type=type(f.default))
    return parser


def parse(argv=None):
    """(RunConfig, EvalConfig, split, metrics_jsonl) from the command line."""
    from megatron_tempnet.arguments import all_flags, parse_args

    known = all_flags()
    ns, rest = _eval_parser(known).parse_known_args(argv)
    ns = vars(ns)
    run = parse_args(rest)
    settings_from_checkpoint(run, rest)
    eval_cfg = run.eval
    eval_cfg = dataclasses.replace(eval_cfg, **{k.split(".", 1)[1]: v for k, v in ns.items()
                                                if k.startswith("eval.")})
    return run, eval_cfg.validate(), ns.get("split_name", "valid"), ns.get("metrics_jsonl")


def settings_from_checkpoint(run, argv) -> None:
    """Evaluating ``--load CKPT`` needs no model or TempNet flags: every model field (unless
    --model or --config chose the model) and every TempNet field not given on the command line
    (or in --config) is the checkpoint's. A given value that differs from the checkpoint's is
    then refused by the load's checks (shapes, TempNet settings), naming the flag."""
    from megatron_tempnet.arguments import given_fields
    from megatron_tempnet.config import ModelConfig
    from megatron_tempnet.tempnet.config import TempNetConfig
    from megatron_tempnet.training.checkpoint_layout import load_format, resolve_load_dir
    from megatron_tempnet.training.run_record import read_run_record

    if not run.checkpoint.load:
        return
    fmt = load_format(run.checkpoint.load)
    path = resolve_load_dir(run.checkpoint.load, None, fmt)
    if path is None:
        return
    try:
        record = read_run_record(path, fmt)
    except Exception:  # noqa: BLE001 -- the load's checksum check names the corrupt file
        return
    given = given_fields(argv)
    if not given & {("", "model"), ("", "config")}:
        run.model = ModelConfig(**{**record["model"], **{
            name: getattr(run.model, name) for section, name in given if section == "model"}})
    saved = {k: v for k, v in record["tempnet"].items()
             if k in {f.name for f in dataclasses.fields(TempNetConfig)}}
    if ("", "config") not in given:
        run.tempnet = TempNetConfig(**{**saved, **{
            name: getattr(run.tempnet, name) for section, name in given if section == "tempnet"}})


def load_model_weights(chunks: list, run, ctx, log) -> int | None:
    """THE checkpoint-loading call site: model weights (TempNet included) from ``--load`` via
    training/checkpointing.py (a DeepSpeed checkpoint: training/deepspeed.py's
    DeepSpeedModelLoader, at its TP), with its shape check; no optimizer, scheduler or RNG
    state. Returns the checkpoint's iteration, or None when nothing was loaded."""
    from megatron_tempnet.training.checkpoint_layout import load_format
    from megatron_tempnet.training.checkpointing import Checkpointer
    from megatron_tempnet.training.run_record import run_record

    ck = getattr(run, "checkpoint", None)
    if ck is None or not ck.load:
        if ctx.rank == 0:
            log("warning: no --load given: evaluating the model as initialised")
        return None
    cfg = dataclasses.replace(ck, save=None, finetune=False, no_load_optim=True,
                              no_load_rng=True).validate()
    record = run_record(run.model, run.tempnet, run.train, ctx)
    if load_format(ck.load) == "deepspeed":
        from megatron_tempnet.training.deepspeed import DeepSpeedModelLoader

        loader = DeepSpeedModelLoader(cfg, chunks, ctx, record, log=log)
    else:
        loader = Checkpointer(cfg, chunks, optimizer=None, scheduler=None, ctx=ctx,
                              record=record, log=log)
    return loader.load()["iteration"]


def main(argv=None, log=None) -> dict:
    from megatron_tempnet.data.datasets import build_datasets, build_micro_batch_iterator
    from megatron_tempnet.parallel import shutdown
    from megatron_tempnet.training.ddp import ddp_options, wrap_chunks
    from megatron_tempnet.training.evaluate import evaluate
    from megatron_tempnet.training.stage import build_stage, report_spec, start

    log = log or (lambda line: print(line, flush=True))
    run, eval_cfg, split, jsonl = parse(argv)
    par, tr = run.parallel, run.train
    ctx, tokenizer = start(run)  # every config check before process groups and data
    samples = eval_cfg.eval_iters * tr.global_batch_size
    _, valid_ds, test_ds = build_datasets(
        run.data, tokenizer, seq_length=tr.seq_length, seed=tr.seed, train_samples=1,
        valid_samples=samples if split == "valid" else 0,
        test_samples=samples if split == "test" else 0)
    dataset = valid_ds if split == "valid" else test_ds
    if dataset is None:
        raise ConfigError(f"--data-path with --split {run.data.split!r} has no {split} "
                          f"documents: give the {split} split a weight > 0")
    batches = build_micro_batch_iterator(dataset, tr.micro_batch_size, tr.global_batch_size,
                                         ctx.dp_rank, ctx.dp_size,
                                         num_workers=run.data.num_workers,
                                         vocab_size=tokenizer.vocab_size)

    chunks = wrap_chunks(build_stage(run, ctx), **ddp_options(par))
    iteration = load_model_weights(chunks, run, ctx, log)

    metrics = evaluate(chunks, batches, eval_cfg.eval_iters, ctx, seq_length=tr.seq_length,
                       micro_batch_size=tr.micro_batch_size,
                       num_microbatches=tr.num_microbatches(ctx.dp_size), config=eval_cfg,
                       spec=report_spec(run))
    if ctx.rank == 0:
        where = f"checkpoint iteration {iteration}" if iteration is not None else "initial model"
        log(format_eval_table(metrics, f"{split} ({where}, loss mode {run.tempnet.loss_mode})"))
        if jsonl:
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"split": split, "iteration": iteration, **metrics}) + "\n")
    shutdown()
    return metrics


def command(argv=None) -> int:
    """``python -m megatron_tempnet.evaluate``: a bad input ends as one line and exit code 2."""
    from megatron_tempnet.cli import run_command

    def evaluate_command(args) -> int:
        main(args)
        return 0

    return run_command(evaluate_command, argv)


if __name__ == "__main__":
    sys.exit(command())

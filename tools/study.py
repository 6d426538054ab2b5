#!/usr/bin/env python
"""A reproducible learning-quality study: does TempNet help, and where?

    python tools/study.py --data-path demo_out/demo_text_document \\
        --tokenizer-model demo_out/tokenizer.model --model tiny-gpt --out study_out \\
        --seeds 1 2 3 --train-iters 200 --training-modes scratch frozen_lm

Trains a grid of short runs, loss modes x rho x training mode x seeds (loss modes: every one of
megatron_tempnet.tempnet.config.LOSS_MODES by default; rho only for the DRO modes; frozen_lm
only where there is a TempNet to train; finetune and frozen_lm start from a plain-CE base model
trained once per seed), each cell a `python -m megatron_tempnet.train` subprocess, and writes
OUT/results.md, OUT/results.json (mean ± std over seeds per row) and OUT/plots/*.png
(validation curves, tau histograms). Run it again to resume: finished cells are not rerun.
Flags after `--` go to every cell's training command (e.g. `-- --tempnet-tau-max 3`).
How it works: megatron_tempnet/experiments/study/.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tempnet.config import ConfigError  # noqa: E402
from megatron_tempnet.experiments.study import (StudyConfig, default_rho,  # noqa: E402
                                                run_study, shell_line, train_command)
from megatron_tempnet.tempnet.config import ARCHS, LOSS_MODES, TRAINING_MODES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = StudyConfig(data_path=[], tokenizer_model="", out="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-path", nargs="+", required=True,
                   help="Megatron dataset prefix(es) (tools/preprocess_data.py output)")
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--tokenizer-type", default=d.tokenizer_type)
    p.add_argument("--out", required=True, help="output directory (reused to resume)")
    p.add_argument("--model", default=d.model, help="model preset (configs/models/)")
    p.add_argument("--split", default=d.split,
                   help=f"train,valid,test document weights (default {d.split})")
    p.add_argument("--loss-modes", nargs="+", default=list(LOSS_MODES), choices=LOSS_MODES)
    p.add_argument("--rho", nargs="+", type=float, default=None,
                   help="rho values of the DRO modes (default: log V - 2.83, V the padded "
                        "vocabulary, as the paper's GPT-2 run)")
    p.add_argument("--training-modes", nargs="+", default=list(TRAINING_MODES),
                   choices=TRAINING_MODES)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS,
                   help="TempNet designs (--tempnet-arch) of the TempNet loss modes "
                        f"(default: {' '.join(ARCHS)})")
    p.add_argument("--tempnet-lr", nargs="+", default=[repr(d.tempnet_lr)],
                   help=f"TempNet's lr: one number, or one per design as ARCH=LR "
                        f"(e.g. paper=3e-2 scale_aware=1e-2); default {d.tempnet_lr}")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds))
    p.add_argument("--train-iters", type=int, default=d.train_iters)
    p.add_argument("--base-iters", type=int, default=None,
                   help="iterations of the CE base model of finetune/frozen_lm "
                        "(default: --train-iters)")
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "lr", "min_lr",
                 "lr_warmup_iters", "log_interval", "eval_interval",
                 "eval_iters"):
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"default {default}")
    p.add_argument("--fixed-tau", type=float, default=None,
                   help="tau of dro_fixed_tau (default: the trainer's, 1.0)")
    p.add_argument("--test-eval-iters", type=int, default=0,
                   help="> 0: evaluate each final checkpoint on the test split with this many "
                        "global batches and report those numbers (default 0: the last "
                        "validation evaluation of the run)")
    p.add_argument("--nproc", type=int, default=1, help="processes per cell (torchrun)")
    p.add_argument("--cell-timeout", type=float, default=None, help="seconds per cell")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    return p


def parse_tempnet_lr(values: list[str]):
    """["1e-3"] -> 1e-3; ["paper=3e-2", "scale_aware=1e-2"] -> {"paper": 0.03, ...}."""
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        pairs = [v.split("=", 1) for v in values]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return {arch: float(lr) for arch, lr in pairs}
    except ValueError:
        raise ConfigError(f"study --tempnet-lr {' '.join(values)!r}: give one number or "
                          "ARCH=LR pairs (e.g. paper=3e-2 scale_aware=1e-2)") from None


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def absolute_data_path(words: list[str]) -> list[str]:
    """--data-path's prefixes made absolute; blend weights ("0.7 a 0.3 b") kept as they are."""
    def is_weight(word: str) -> bool:
        try:
            float(word)
            return True
        except ValueError:
            return False
    return [w if is_weight(w) else os.path.abspath(w) for w in words]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    cfg = StudyConfig(  # paths made absolute: the cells run with the repository as cwd
        data_path=absolute_data_path(args.data_path),
        tokenizer_model=os.path.abspath(args.tokenizer_model),
        tokenizer_type=args.tokenizer_type, out=os.path.abspath(args.out), model=args.model,
        split=args.split,
        loss_modes=tuple(args.loss_modes), rhos=(), training_modes=tuple(args.training_modes),
        seeds=tuple(args.seeds), train_iters=args.train_iters, base_iters=args.base_iters,
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, lr=args.lr, min_lr=args.min_lr,
        lr_warmup_iters=args.lr_warmup_iters, archs=tuple(args.archs),
        fixed_tau=args.fixed_tau, log_interval=args.log_interval,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        test_eval_iters=args.test_eval_iters, nproc=args.nproc, extra_args=extra,
        cell_timeout_s=args.cell_timeout)
    try:
        cfg.tempnet_lr = parse_tempnet_lr(args.tempnet_lr)
        cfg.rhos = tuple(args.rho) if args.rho else (default_rho(cfg),)
        cfg.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        for cell in cfg.plan():
            print(shell_line(train_command(cfg, cell)))
        return 0
    # SIGTERM (kill, a batch system) unwinds like Ctrl-C: the running cell's process group is
    # stopped and the cell stays unfinished (rerun next time)
    signal.signal(signal.SIGTERM, _terminate)
    report = run_study(cfg, plots=not args.no_plots)
    failed = [c["cell"] for c in report["cells"] if c["status"] != "ok"]
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

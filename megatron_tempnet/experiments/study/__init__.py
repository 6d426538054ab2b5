"""A learning-quality study: does TempNet help, and where? (``tools/study.py`` is its CLI.)

A grid of short trainings, loss modes x rho x training mode x seeds, on one model preset and one
Megatron .bin/.idx dataset:

* loss modes come from ``tempnet.config.LOSS_MODES`` (new modes join by themselves); rho is
  swept only for the modes whose gradients depend on it (not :data:`RHO_FREE_LOSS_MODES`);
* the TempNet modes are run with every design of ``archs`` (``--tempnet-arch``: "paper",
  "scale_aware"); the other modes have no TempNet and run once;
* a (loss mode, training mode) pair the trainer's own validation rejects is left out (frozen_lm
  of a mode without TempNet has nothing to train): :func:`mode_supported`;
* finetune and frozen_lm start from a plain-CE base model per seed (``--load BASE --finetune``),
  trained once like any cell (with the same iterations it *is* the grid's ce/scratch cell).

Each cell runs as its own subprocess, ``python -m megatron_tempnet.train ...`` (``torchrun
--standalone`` for nproc > 1), so a crash is recorded (``error``) and the study goes on. Its
metrics come from its JSONL file (``training/metrics_log.py``): the validation evaluations of
``training/evaluate.py`` (perplexity and ECE at tau = 1, with the model's own tau, at the best
global temperature; TempNet's tau histogram) give the curves, the last one (at the final
iteration) the table. With ``test_eval_iters`` > 0 the final checkpoint is also evaluated on the
test split by ``python -m megatron_tempnet.evaluate`` with one fixed seed (the same tokens for
every cell), and those numbers go into the table instead.

Layout of the output directory::

    study.json                 the settings of the last invocation
    cells/<cell>/              command.txt, train.log, metrics.jsonl, [ckpt/, eval.log,
                               test_eval.jsonl], result.json (written atomically, last)
    results.md, results.json   one row per (loss mode, rho, training mode, iterations):
                               mean and standard deviation over seeds
    plots/valid_curves.png, plots/tau_histograms.png

Resume: a cell whose result.json exists, succeeded and was produced by the same command
(``fingerprint``) is not rerun; any other cell (never run, interrupted, failed, or its settings
changed) is deleted and rerun from scratch. Rerunning from scratch rather than from a mid-run
checkpoint keeps every cell's validation batches identical (the validation iterator is not part
of a checkpoint).

Modules, one job each:

    config:    StudyConfig, Cell, the grid (cells, plan, base models), default_rho
    commands:  the cells' training / evaluation command lines, fingerprint
    metrics:   a cell's metrics JSONL -> summary of one evaluation, curves, parameter count
    runner:    running a cell (subprocess, result.json, resume) and the whole study (run_study)
    aggregate: the results.json dict: the COLUMNS, mean ± std over seeds, paired ratios
    report:    results.json and results.md
    plots:     plots/valid_curves.png, plots/tau_histograms.png
"""
from megatron_tempnet.experiments.study.aggregate import COLUMNS
from megatron_tempnet.experiments.study.commands import (FINAL_EVAL_SEED, cell_dir, eval_command,
                                                         fingerprint, shell_line, train_command)
from megatron_tempnet.experiments.study.config import (Cell, StudyConfig, default_rho,
                                                       mode_supported, mode_uses_rho)
from megatron_tempnet.experiments.study.plots import write_plots
from megatron_tempnet.experiments.study.report import markdown_table, write_tables
from megatron_tempnet.experiments.study.runner import RESULT_FILE, run_cell, run_study

__all__ = ["COLUMNS", "FINAL_EVAL_SEED", "RESULT_FILE", "Cell", "StudyConfig", "cell_dir",
           "default_rho", "eval_command", "fingerprint", "markdown_table", "mode_supported",
           "mode_uses_rho", "run_cell", "run_study", "shell_line", "train_command",
           "write_plots", "write_tables"]

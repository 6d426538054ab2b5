"""The study's tables: results.json and results.md (a Markdown table, mean ± std over seeds)."""
from __future__ import annotations

import os

from megatron_tempnet.experiments.study.aggregate import COLUMNS
from megatron_tempnet.experiments.study.commands import FINAL_EVAL_SEED
from megatron_tempnet.experiments.study.config import StudyConfig
from megatron_tempnet.files import write_json_atomic


def _cell_text(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "-"
    text = fmt.format(stat["mean"])
    return text if stat["std"] is None else f"{text} ± {fmt.format(stat['std'])}"


def markdown_table(report: dict) -> str:
    """The rows of ``report`` as a Markdown table (mean ± std over seeds)."""
    header = ["loss mode", "TempNet", "rho", "training", "iters", "seeds ok", "own τ is"]
    header += [title for _, title, _ in COLUMNS] + ["error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["loss mode"], row.get("arch") or "-",
                 "-" if row["rho"] is None else f"{row['rho']:g}",
                 row["training mode"], str(row["iterations"]),
                 f"{row['seeds ok']}/{len(row['seeds'])}", row["own tau name"] or "-"]
        cells += [_cell_text(row[key], fmt) for key, _, fmt in COLUMNS]
        cells.append((row["error"] or "").replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(cfg: StudyConfig, report: dict, plots: bool = True) -> None:
    out = cfg.out_dir
    write_json_atomic(out / "results.json", report)
    split = {r["final split"] for r in report["rows"] if r["final split"]}
    where = ("the test split (python -m megatron_tempnet.evaluate, seed "
             f"{FINAL_EVAL_SEED}, {cfg.test_eval_iters} global batches)" if split == {"test"}
             else f"the validation split at the last iteration ({cfg.eval_iters} global batches)")
    text = (f"# Study: {cfg.model} on {' '.join(cfg.data_path)}\n\n"
            f"Mean ± standard deviation over seeds {list(cfg.seeds)}; {cfg.train_iters} "
            f"iterations x {cfg.global_batch_size} x {cfg.seq_length} tokens per cell; "
            f"metrics on {where}. \"own τ\": the model's own temperature (TempNet's per-token "
            "tau, its mean shown; the fixed tau; 1 for CE).\n\n"
            + markdown_table(report) + "\n"
            + ("\nPlots: [validation curves](plots/valid_curves.png), "
               "[tau histograms](plots/tau_histograms.png).\n" if plots else ""))
    tmp = out / ".results.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / "results.md")

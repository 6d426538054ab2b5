"""The study's results.json: the table's columns, one row per (loss mode, TempNet design, rho,
training mode, iterations) with the mean and standard deviation over seeds, the paired ratios
("own / best T", "own / ce"), every cell's own numbers and curves."""
from __future__ import annotations

import dataclasses
import math

from megatron_tempnet.experiments.study.config import (BASE_LOSS_MODE, BASE_TRAINING_MODE, Cell,
                                                       StudyConfig)

# (key in a cell's summary, Markdown header, format) of the table, in order. Two ratios are
# paired, so the seed-to-seed spread of the data cancels: "own / best T" = ppl with the model's
# own tau / ppl at the best global T of the same evaluation (< 1: the per-token tau beats any
# single temperature); "own / ce" = ppl with the own tau / ppl of the same seed's ce/scratch
# cell (same validation tokens; < 1: better than plain CE).
COLUMNS = (("ppl tau=1", "ppl τ=1", "{:.2f}"),
           ("ppl own tau", "ppl own τ", "{:.2f}"),
           ("own tau", "own τ", "{:.3f}"),
           ("best T", "best T", "{:.3f}"),
           ("ppl best T", "ppl best T", "{:.2f}"),
           ("ece tau=1", "ECE τ=1", "{:.4f}"),
           ("ece own tau", "ECE own τ", "{:.4f}"),
           ("ece best T", "ECE best T", "{:.4f}"),
           # the temperature tools beside TempNet (tempnet/temperature_tools.py), untuned
           ("ppl entropy T", "ppl entropy T", "{:.2f}"),
           ("ppl threshold T", "ppl threshold T", "{:.2f}"),
           ("ppl ensemble", "ppl ensemble", "{:.2f}"),
           ("ece entropy T", "ECE entropy T", "{:.4f}"),
           ("ece threshold T", "ECE threshold T", "{:.4f}"),
           ("ece ensemble", "ECE ensemble", "{:.4f}"),
           ("own / best T", "own ÷ best T", "{:.3f}"),
           ("own / ce", "own ÷ CE", "{:.3f}"),
           ("tau std", "τ std", "{:.3f}"),  # the own tau's spread over tokens
           ("r2 tau*", "R² τ vs τ*", "{:.3f}"),  # tempnet_dro: TempNet's tau vs the exact tau*
           ("accuracy", "top-1", "{:.4f}"),
           ("wall s", "wall s", "{:.0f}"))


def _mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; None with one value)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else None)
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate(cfg: StudyConfig, results: dict) -> dict:
    """results.json: one row per (loss mode, rho, training mode, iterations), mean and std over
    the seeds that succeeded; every cell's own numbers and errors under "cells"."""
    rows: dict[tuple, list] = {}
    ce_ppl = {}  # seed -> ppl of its ce/scratch cell (the reference of "own / ce")
    for cell, result in results.items():
        rows.setdefault(cell.row_key, []).append((cell, result))
        if result["status"] == "ok" and cell == Cell(BASE_LOSS_MODE, None, BASE_TRAINING_MODE,
                                                     cell.seed, cfg.train_iters):
            ce_ppl[cell.seed] = result["summary"]["ppl tau=1"]
    for cell, result in results.items():
        s = result["summary"]
        if s is not None:  # derived here: a cached result.json may predate these columns
            s["own / best T"] = s["ppl own tau"] / s["ppl best T"]
            s["own / ce"] = s["ppl own tau"] / ce_ppl[cell.seed] if cell.seed in ce_ppl else None
    table = []
    for (loss, arch, rho, tmode, iters), members in rows.items():
        ok = [r for _, r in members if r["status"] == "ok"]
        row = {"loss mode": loss, "arch": arch, "rho": rho, "training mode": tmode,
               "iterations": iters,
               "seeds": [c.seed for c, _ in members], "seeds ok": len(ok),
               "own tau name": ok[0]["summary"]["own tau name"] if ok else None,
               "final split": ok[0]["final split"] if ok else None,
               "error": "; ".join(f"seed {c.seed}: {r['error']}" for c, r in members
                                  if r["status"] != "ok") or None}
        for key, _, _ in COLUMNS:
            row[key] = _mean_std([r["summary"].get(key) for r in ok])
        table.append(row)
    cells = [{k: r.get(k) for k in ("cell", "loss_mode", "arch", "rho", "training_mode", "seed",
                                "train_iters", "status", "error", "wall s", "final split",
                                "summary", "parameters", "command")}
             for r in results.values()]
    tokens = cfg.train_iters * cfg.global_batch_size * cfg.seq_length
    params = next((r["parameters"] for r in results.values() if r["parameters"]), None)
    return {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "python"},
            "train tokens per cell": tokens, "parameters (first cell)": params,
            "columns": [key for key, _, _ in COLUMNS], "rows": table, "cells": cells,
            "curves": {r["cell"]: {"valid": r["valid curve"], "train": r["train curve"],
                                   "tau histogram": (r["final"] or {}).get("tau histogram"),
                                   "tau mean": (r["summary"] or {}).get("own tau")}
                       for r in results.values()}}

"""A cell's numbers from its metrics JSONL (``training/metrics_log.py``): the table's summary
of one evaluation, the validation and training curves, the parameter count."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_tempnet.training.config import TEMPERATURE_TOOLS


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def _finite(value):
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):  # metrics_log's encoding
        return float(value)
    return value


def _own_suffix(metrics: dict) -> str | None:
    """The model's own temperature in an evaluation dict: "tempnet", "fixed tau", or any other
    ``ppl <x>`` key beside tau=1, best T and the temperature tools (a loss mode added later);
    None: tau = 1."""
    others = {"tau=1", "best T", *TEMPERATURE_TOOLS}
    for key in metrics:
        if key.startswith("ppl ") and key[len("ppl "):] not in others:
            return key[len("ppl "):]
    return None


def summarize(metrics: dict) -> dict:
    """The table's numbers from one evaluation dict (``training.evaluate.evaluate``'s keys)."""
    m = {k: _finite(v) for k, v in metrics.items()}
    own = _own_suffix(m)
    out = {"ppl tau=1": m["ppl tau=1"], "ece tau=1": m["ece tau=1"], "best T": m["best T"],
           "ppl best T": m["ppl best T"], "ece best T": m["ece best T"],
           "accuracy": m["accuracy"], "eval tokens": m["eval tokens"],
           "own tau name": own or "tau=1"}
    out.update({"tau std": m.get("tau std"), "r2 tau*": m.get("r2 tau*"),
                "pearson tau*": m.get("pearson tau*"), "tau* mean": m.get("tau* mean")})
    for tool in TEMPERATURE_TOOLS:  # None for an evaluation from before the tools
        out.update({f"ppl {tool}": m.get(f"ppl {tool}"), f"ece {tool}": m.get(f"ece {tool}")})
    if own is None:
        out.update({"ppl own tau": m["ppl tau=1"], "ece own tau": m["ece tau=1"],
                    "own tau": 1.0})
    else:
        out.update({"ppl own tau": m[f"ppl {own}"], "ece own tau": m.get(f"ece {own}"),
                    "own tau": m.get("tau mean", m.get(own))})
    return out


def _curves(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(validation points, training points), one per iteration (the last record wins)."""
    valid, train = {}, {}
    for r in records:
        if r.get("split") == "valid":
            s = summarize(r)
            valid[r["iteration"]] = {"iteration": r["iteration"], **{
                k: s[k] for k in ("ppl tau=1", "ppl own tau", "ppl best T", "own tau")}}
        elif r.get("split") == "train":
            train[r["iteration"]] = {"iteration": r["iteration"],
                                     **{k: _finite(r[k]) for k in ("lm loss", "tau")
                                        if k in r}}
    return [valid[i] for i in sorted(valid)], [train[i] for i in sorted(train)]


def _parameters(records: list[dict]) -> int | None:
    """The model's parameter count from the run's configuration record in metrics.jsonl."""
    return next((r["parameters on this stage"] for r in records if r.get("split") == "config"),
                None)

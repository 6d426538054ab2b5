"""What a checkpoint remembers of the run that saved it (:func:`run_record`: the model / tempnet
/ train / parallel sections as plain dicts) and the checks a load makes against this run's:
tensor shapes (:func:`check_shapes`), TempNet settings, data order and lr / weight-decay
schedule (``*_differences``: (flag, checkpoint value, this run's value)). No torch at import."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_tempnet.config import ConfigError, padded_vocab_size
from megatron_tempnet.tempnet.config import TEMPNET_LOSS_MODES

# Model fields that decide tensor shapes (compared before any tensor is loaded).
SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "tie_embeddings")


def run_record(model_cfg, tempnet_cfg, train_cfg, ctx) -> dict:
    """What a checkpoint remembers of the run that saved it (plain dicts)."""
    return {"model": dataclasses.asdict(model_cfg), "tempnet": dataclasses.asdict(tempnet_cfg),
            "train": dataclasses.asdict(train_cfg),
            "parallel": {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}}


def read_common_state(path, fmt: str = "torch_dist") -> dict:
    """What the checkpoint directory ``path`` in format ``fmt`` (a key of
    checkpoint_layout.CHECKPOINT_FORMATS) stores beside its tensors: iteration,
    consumed_samples, config (the run record), ... (no tensor read: torch is imported here
    only)."""
    if fmt == "deepspeed":
        from megatron_tempnet.training.deepspeed import read_client_state

        return read_client_state(path)
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path))


def read_run_record(path, fmt: str = "torch_dist") -> dict:
    """The run record of the checkpoint directory ``path`` in format ``fmt``."""
    return read_common_state(path, fmt)["config"]


def record_configs(record: dict):
    """(ModelConfig, TempNetConfig) of a run record; TempNet fields this version does not know
    (a record of another version) are left out."""
    from megatron_tempnet.config import ModelConfig
    from megatron_tempnet.tempnet.config import TempNetConfig

    names = {f.name for f in dataclasses.fields(TempNetConfig)}
    return (ModelConfig(**record["model"]),
            TempNetConfig(**{k: v for k, v in record["tempnet"].items() if k in names}))


def saved_padded_vocab(record: dict) -> int:
    """The padded vocabulary of the model a checkpoint's run record describes."""
    m = record["model"]
    return padded_vocab_size(m["vocab_size"], m["make_vocab_size_divisible_by"],
                             record["parallel"]["tp"])


def shape_mismatches(saved: dict, current: dict, *, finetune: bool) -> list[str]:
    """'field: checkpoint X, this run Y' for every field whose difference changes tensor shapes
    (or, when resuming, the set of trained tensors)."""
    out = []
    sm, cm = saved["model"], current["model"]
    fields = SHAPE_FIELDS + (("max_position_embeddings",) if cm["family"] == "gpt" else ())
    for name in fields:
        if sm.get(name) != cm.get(name):
            out.append(f"{name}: checkpoint {sm.get(name)!r}, this run {cm.get(name)!r}")
    st, ct = saved["tempnet"], current["tempnet"]
    both_tempnet = {st["loss_mode"], ct["loss_mode"]} <= set(TEMPNET_LOSS_MODES)  # both heads
    saved_arch = st.get("arch", "paper")  # checkpoints from before --tempnet-arch: the paper's
    if both_tempnet and saved_arch == ct["arch"] and st["hidden_size"] != ct["hidden_size"]:
        out.append(f"tempnet hidden_size: checkpoint {st['hidden_size']!r}, this run "
                   f"{ct['hidden_size']!r}")
    if both_tempnet and not finetune and saved_arch != ct["arch"]:
        out.append(f"tempnet arch: checkpoint {saved_arch!r}, this run {ct['arch']!r} (pass "
                   f"--tempnet-arch {saved_arch}, or --finetune to load the LM weights only "
                   "and start this run's TempNet from its init)")
    if not finetune and st["loss_mode"] != ct["loss_mode"]:
        out.append(f"tempnet loss_mode: checkpoint {st['loss_mode']!r}, this run "
                   f"{ct['loss_mode']!r} (use --finetune to load the LM weights only)")
    return out


def check_shapes(path: Path, saved: dict, current: dict, *, finetune: bool) -> None:
    bad = shape_mismatches(saved, current, finetune=finetune)
    if bad:
        raise ConfigError(f"checkpoint {path} was saved with another model shape: "
                          + "; ".join(bad) + ". Use the model flags of the run that saved it.")


# Settings that change what a loaded model computes (evaluation and resume; --finetune may
# change them), what a resume's data order is, and its lr / weight-decay schedule.
TEMPNET_SEMANTIC_FIELDS = ("tau_min", "tau_max", "rho", "fixed_tau", "input_convention")
DATA_ORDER_FIELDS = ("seq_length", "seed")
SCHEDULE_FIELDS = {"train": ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style",
                             "weight_decay"),
                   "tempnet": ("lr", "lr_schedule", "weight_decay")}


def _flag(section: str, name: str) -> str:
    return ("--tempnet-" if section == "tempnet" else "--") + name.replace("_", "-")


def _differences(saved: dict, current: dict, fields) -> list[tuple[str, object, object]]:
    """(flag, checkpoint value, this run's value) for each (section, field) that differs
    (fields missing in an older checkpoint's record are not compared)."""
    out = []
    for section, name in fields:
        old, new = saved.get(section, {}), current[section]
        if name in old and old[name] != new.get(name):
            out.append((_flag(section, name), old[name], new.get(name)))
    return out


def describe_differences(diffs) -> str:
    return "; ".join(f"{flag}: checkpoint {old!r}, this run {new!r}" for flag, old, new in diffs)


def semantic_differences(saved: dict, current: dict) -> list:
    """TempNet settings that change every number of a loaded TempNet / DRO model."""
    if current["tempnet"]["loss_mode"] == "ce":
        return []
    return _differences(saved, current, [("tempnet", n) for n in TEMPNET_SEMANTIC_FIELDS])


def data_order_differences(saved: dict, current: dict) -> list:
    """Settings that decide a resume's data order (it continues at the consumed samples)."""
    return _differences(saved, current, [("train", n) for n in DATA_ORDER_FIELDS])


def schedule_differences(saved: dict, current: dict) -> list:
    """lr / weight-decay schedule settings that differ (the decay length as the scheduler
    sees it: --lr-decay-iters, else --train-iters)."""
    fields = [(s, n) for s, names in SCHEDULE_FIELDS.items() for n in names
              if s == "train" or current["tempnet"]["loss_mode"] != "ce"]
    diffs = _differences(saved, current, fields)
    decay = [r["train"].get("lr_decay_iters") or r["train"].get("train_iters")
             for r in (saved, current)]
    if decay[0] != decay[1] and current["train"]["lr_decay_style"] != "constant":
        diffs.append(("--lr-decay-iters (default: --train-iters)", *decay))
    return diffs

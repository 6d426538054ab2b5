"""Checkpoints <-> Hugging Face directories (tools/convert_checkpoint_to_hf.py and
tools/convert_hf_to_checkpoint.py call these).

Both directions go through one process holding the whole model at TP=1, PP=1: megatron-core's
``dist_checkpointing`` reshards on load and save, so a checkpoint saved at any TP/PP is read
here, and a checkpoint written here is loaded by training at any TP/PP.
The vocabulary padding of the saving layout is kept (``make_vocab_size_divisible_by`` x the
saved TP) so the padded rows, which TempNet reads, survive.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from megatron_tempnet.config import ConfigError, ModelConfig
from megatron_tempnet.tempnet.config import TempNetConfig
from megatron_tempnet.training import integrity


def _single_process():
    """TP=1, PP=1 in this process on a free port: a surrounding job's MASTER_PORT, RANK or
    WORLD_SIZE (a SLURM step, a torchrun shell) are not this tool's."""
    from megatron_tempnet.parallel import initialize

    return initialize(1, 1, seed=0, environ={"MASTER_ADDR": "127.0.0.1"})


def checkpoint_config(path: Path) -> tuple[ModelConfig, TempNetConfig, dict]:
    """The model and TempNet configs a checkpoint directory was saved with."""
    from megatron_tempnet.training.run_record import read_run_record, record_configs

    record = read_run_record(path)
    return (*record_configs(record), record)


def model_for_layout(model_cfg: ModelConfig, saved_tp: int) -> ModelConfig:
    """model_cfg whose TP=1 padding equals the padding of a model saved at TP=saved_tp."""
    return dataclasses.replace(
        model_cfg, make_vocab_size_divisible_by=model_cfg.make_vocab_size_divisible_by * saved_tp)


def load_checkpoint_full(load: str, scratch_dir: str | None = None
                         ) -> tuple[dict, ModelConfig, TempNetConfig]:
    """The full (TP=1, PP=1) state dict of the checkpoint at ``load`` (a save dir or iter dir).
    A DeepSpeed checkpoint is first converted to a megatron-core one
    (training/convert_deepspeed.py) in a temporary directory inside ``scratch_dir`` (default:
    the system's), deleted afterwards."""
    from megatron_tempnet.training.checkpoint_layout import load_format

    if load_format(load) == "deepspeed":
        import tempfile

        from megatron_tempnet.training.convert_deepspeed import deepspeed_to_torch_dist

        with tempfile.TemporaryDirectory(prefix="deepspeed-to-torch-dist-",
                                         dir=scratch_dir) as tmp:
            return load_checkpoint_full(str(deepspeed_to_torch_dist(load, tmp, log=_quiet)))
    return _load_torch_dist_full(load)


def _quiet(line: str) -> None:
    pass


def _load_torch_dist_full(load: str) -> tuple[dict, ModelConfig, TempNetConfig]:
    from megatron.core import dist_checkpointing

    from megatron_tempnet.models.sharding import model_tensors
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.training.checkpoint_layout import resolve_load_dir
    from megatron_tempnet.training.checkpointing import model_sharded_state_dict

    path = resolve_load_dir(load, None)
    if path is None:
        raise ConfigError(f"--load {load}: no checkpoint there yet")
    _check_complete(path)
    if integrity.verify_manifest(path) != "verified":
        print(f"warning: {path} has no {integrity.MANIFEST} (saved before checksums were "
              "recorded): its files are not verified", file=sys.stderr)
    model_cfg, tempnet_cfg, record = checkpoint_config(path)
    cfg = model_for_layout(model_cfg, record["parallel"]["tp"])
    ctx = _single_process()
    model = build_tempnet_model(cfg, dataclasses.replace(tempnet_cfg, training_mode="scratch"),
                                ctx)
    loaded = dist_checkpointing.load(model_sharded_state_dict([model]), str(path))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
    return model_tensors(model), cfg, tempnet_cfg


def _check_complete(path: Path) -> None:
    """A dist_checkpointing directory lists its shard files in metadata; name any that is gone."""
    meta = path / ".metadata"
    if not (path / "metadata.json").exists() or not meta.exists():
        raise ConfigError(f"{path} is not a complete checkpoint (metadata.json or .metadata "
                          f"missing): {sorted(p.name for p in path.iterdir())[:12]}")
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(path)).read_metadata().storage_data
        files = sorted({info.relative_path for info in storage.values()})
    except Exception as e:  # an unreadable .metadata is as bad as a missing one
        raise ConfigError(f"{path}: cannot read its shard index ({e})") from e
    absent = [f for f in files if not (path / f).exists()]
    if absent:
        raise ConfigError(f"checkpoint {path} is missing shard file(s) {absent}: copy the whole "
                          "directory")


def checkpoint_to_hf(load: str, output: str, tokenizer_file: str | None = None,
                     dtype: torch.dtype = torch.float32, eval_jsonl: str | None = None,
                     training_data: str | None = None) -> Path:
    """Export the checkpoint at ``load`` to ``output`` (hf/export.py). ``eval_jsonl``: the
    ``--metrics-jsonl`` file of ``python -m megatron_tempnet.evaluate`` for the model card's
    evaluation table; ``training_data``: a line on the data for the model card."""
    from megatron_tempnet.hf.export import export_hf
    from megatron_tempnet.hf.model_card import read_eval_jsonl
    from megatron_tempnet.hf.modeling import has_own_tau

    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--output {output} already exists and is not an empty directory; "
                          "refusing to overwrite it: give another --output (or delete it)")
    if tokenizer_file and not Path(tokenizer_file).is_file():
        raise ConfigError(f"--tokenizer-model {tokenizer_file}: no such file; give the "
                          "SentencePiece .model or tokenizers .json the run trained with")
    info = checkpoint_info(load)
    evaluation = read_eval_jsonl(eval_jsonl, info.get("iteration")) if eval_jsonl else None
    full, cfg, tempnet_cfg = load_checkpoint_full(load, scratch_dir=str(out.absolute().parent))
    # a TempNet head or the exact tau* ("dro_exact"); "ce" and "dro_fixed_tau" export plain
    return export_hf(output, full, cfg, tempnet_cfg if has_own_tau(tempnet_cfg) else None,
                     tokenizer_file=tokenizer_file, dtype=dtype,
                     card=dict(info, evaluation=evaluation, training_data=training_data))


def checkpoint_info(load: str) -> dict:
    """What the model card tells of a checkpoint: source (its directory), iteration,
    consumed_samples, record (the run record); {} when ``load`` holds none (the load that
    follows names the problem)."""
    from megatron_tempnet.training.checkpoint_layout import load_format, resolve_load_dir
    from megatron_tempnet.training.run_record import read_common_state

    try:
        fmt = load_format(load)
        path = resolve_load_dir(load, None, fmt)
        common = read_common_state(path, fmt) if path else None
    except Exception:  # noqa: BLE001  (load_checkpoint_full reports a bad checkpoint)
        return {}
    if not isinstance(common, dict):
        return {}
    return {"source": str(path), "iteration": common.get("iteration"),
            "consumed_samples": common.get("consumed_samples"), "record": common.get("config")}


# Hugging Face model_type -> our family; the TempNet ones are this project's own exports
HF_FAMILIES = {"llama": "llama", "gpt2": "gpt", "tempnet_llama": "llama", "tempnet_gpt2": "gpt"}


def read_hf_config(hf_dir: str) -> tuple[dict, str]:
    """(config.json of a Hugging Face LLaMA or GPT-2 directory, our family); nothing else read."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConfigError(f"--input {hf_dir}: no such directory; give a Hugging Face model "
                          "directory (save_pretrained output with config.json)")
    if not path.is_file():
        raise ConfigError(f"--input {hf_dir}: no config.json in it; give a Hugging Face model "
                          "directory (save_pretrained output)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"--input {hf_dir}: config.json is not JSON ({e}); re-save the "
                          "model with save_pretrained") from e
    family = HF_FAMILIES.get(config.get("model_type"))
    if family is None:
        raise ConfigError(f"{hf_dir}: model_type {config.get('model_type')!r} is not supported; "
                          f"supported: {', '.join(sorted(HF_FAMILIES))}")
    return config, family


def exported_tempnet_config(config: dict) -> TempNetConfig | None:
    """The TempNetConfig a TempNet export (config.json's ``tempnet``) was trained with, read as
    the export's own model code reads it (hf/remote/tempnet_math.py ``tempnet_config``: older
    exports' defaults, dropout off); None for a plain model."""
    from megatron_tempnet.hf.remote.tempnet_math import tempnet_config

    return tempnet_config(config["tempnet"]) if "tempnet" in config else None


def vocab_divisible_by(config: dict, divisible_by: int | None, target_tp: int) -> int:
    """make_vocab_size_divisible_by for a model converted for ``target_tp``: the given value
    (default 128); a TempNet export keeps the padded vocabulary it was trained with (its head
    reads those logits): padded / TP, and a given value must give the same padding."""
    from megatron_tempnet.config import padded_vocab_size

    padded = config.get("padded_vocab_size") if "tempnet" in config else None
    if padded is None:
        return divisible_by or 128
    if padded % target_tp:
        raise ConfigError(f"--target-tensor-parallel-size {target_tp} does not divide the "
                          f"{padded} padded vocabulary rows TempNet was trained on: use a TP "
                          f"that divides {padded}")
    if divisible_by and padded_vocab_size(config["vocab_size"], divisible_by,
                                          target_tp) != padded:
        raise ConfigError(f"--make-vocab-size-divisible-by {divisible_by} pads the vocabulary "
                          f"to another size than the {padded} rows TempNet was trained on: "
                          "drop the flag (the export's padding is kept)")
    return padded // target_tp


def hf_to_full(hf_dir: str, make_vocab_size_divisible_by: int | None = None, target_tp: int = 1
               ) -> tuple[dict, ModelConfig, TempNetConfig | None]:
    """A Hugging Face LLaMA or GPT-2 directory (or a TempNet export of this project) -> (full
    megatron state dict with the vocabulary padded for ``target_tp``, ModelConfig, the
    TempNetConfig of a TempNet export or None). A TempNet export's padded output rows come
    back from its ``pad_logit_weight`` and its ``tempnet.*`` weights are kept."""
    from transformers import AutoModelForCausalLM

    import megatron_tempnet.hf.modeling  # noqa: F401  (the TempNet Auto classes)
    from megatron_tempnet.hf import family_module
    from megatron_tempnet.hf.export import TEMPNET_PREFIX, output_key

    config, family = read_hf_config(hf_dir)
    tempnet_cfg = exported_tempnet_config(config)
    divisible = vocab_divisible_by(config, make_vocab_size_divisible_by, target_tp)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    cfg = model_config_from_hf(family, model.config, divisible)
    hf = model.state_dict()
    rows = model_for_layout(cfg, target_tp).padded_vocab_size()
    full = {k: _pad_rows(v, rows) if k in VOCAB_KEYS else v
            for k, v in family_module(family).from_hf(hf, cfg).items()}
    if tempnet_cfg is not None:
        full.update({k: v for k, v in hf.items() if k.startswith(TEMPNET_PREFIX)})
        full[output_key(cfg)][cfg.vocab_size:] = hf["pad_logit_weight"]
    return full, cfg, tempnet_cfg


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > len(t) else t


def model_config_from_hf(family: str, c, make_vocab_size_divisible_by: int) -> ModelConfig:
    if family == "llama":
        return ModelConfig(
            family="llama", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
            num_attention_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads,
            ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size,
            max_position_embeddings=c.max_position_embeddings, norm_epsilon=c.rms_norm_eps,
            rotary_base=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"],
            tie_embeddings=c.tie_word_embeddings,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    return ModelConfig(
        family="gpt", num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
        ffn_hidden_size=c.n_inner or 4 * c.n_embd, vocab_size=c.vocab_size,
        max_position_embeddings=c.n_positions, norm_epsilon=c.layer_norm_epsilon,
        tie_embeddings=c.tie_word_embeddings,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def hf_to_checkpoint(hf_dir: str, save: str, make_vocab_size_divisible_by: int | None = None,
                     target_tp: int = 1) -> Path:
    """Write ``save``/iter_0000000 (model weights only) + the latest marker: ready for
    ``--load SAVE --finetune`` (finetune and frozen-LM modes). dist_checkpointing reshards to
    any TP/PP; only the vocabulary padding depends on the TP size (divisible_by x TP), so the
    embedding is padded for ``target_tp`` (a TempNet export keeps its own padding). A TempNet
    export keeps its TempNet weights, and its settings go into the run record."""
    from megatron_tempnet.config import TrainConfig
    from megatron_tempnet.models.sharding import load_local
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.training.checkpoint_layout import (CHECKPOINT_VERSION, iteration_dir,
                                                             write_latest)
    from megatron_tempnet.training.checkpointing import (WEIGHTS_ONLY, model_sharded_state_dict,
                                                         save_sharded)
    from megatron_tempnet.training.checkpoint_layout import check_new_save_dir

    _check_hf_to_checkpoint(hf_dir, make_vocab_size_divisible_by, target_tp)
    check_new_save_dir(save)
    full, cfg, tempnet_cfg = hf_to_full(hf_dir, make_vocab_size_divisible_by, target_tp)
    tempnet_cfg = tempnet_cfg or TempNetConfig()
    padded = model_for_layout(cfg, target_tp)
    ctx = _single_process()
    model = build_tempnet_model(padded, dataclasses.replace(tempnet_cfg, training_mode="scratch"),
                                ctx)
    load_local(model, full)
    path = iteration_dir(save, 0)
    path.mkdir(parents=True, exist_ok=True)
    state = model_sharded_state_dict([model])
    state.update(iteration=0, consumed_samples=0, checkpoint_version=CHECKPOINT_VERSION,
                 config={"model": dataclasses.asdict(cfg),
                         "tempnet": dataclasses.asdict(tempnet_cfg),
                         "train": dataclasses.asdict(TrainConfig()),
                         "parallel": {"tp": target_tp, "pp": 1, "dp": 1}},
                 **{WEIGHTS_ONLY: f"converted from the Hugging Face model {hf_dir}"})
    save_sharded(state, path)
    integrity.write_manifest(path)
    write_latest(save, 0)
    return path


def _check_hf_to_checkpoint(hf_dir: str, divisible_by: int | None, target_tp: int) -> None:
    """The bad inputs of hf_to_checkpoint found in config.json alone (hf_to_full names a
    TempNet export's padding or settings), before any weight is read or file written."""
    from math import gcd

    config, family = read_hf_config(hf_dir)
    heads = config.get("num_attention_heads" if family == "llama" else "n_head")
    groups = (config.get("num_key_value_heads") if family == "llama" else None) or heads
    if divisible_by is not None and divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by {divisible_by} must be >= 1: use 128")
    if heads and (target_tp < 1 or heads % target_tp or groups % target_tp):
        valid = [tp for tp in range(1, gcd(heads, groups) + 1) if gcd(heads, groups) % tp == 0]
        raise ConfigError(
            f"--target-tensor-parallel-size {target_tp} does not divide the {heads} attention "
            f"heads / {groups} query groups of {hf_dir}: use one of {valid}")


# ---------------------------------------------------------------------------------------------
# What a converter wrote, read back from what it wrote (the tools print it)

def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _tempnet_words(t: dict | None) -> str:
    if not t:
        return "no TempNet (plain model)"
    words = f"TempNet loss mode {t.get('loss_mode')}"
    if t.get("loss_mode") != "dro_exact":
        words += f", arch {t.get('arch', 'paper')}, hidden {t.get('hidden_size')}"
    return words + f", tau in [{t.get('tau_min')}, {t.get('tau_max')}], rho {t.get('rho')}"


def describe_hf_dir(out: Path) -> str:
    """One line on the Hugging Face directory ``out``: class, dtype, parameters (TempNet's),
    TempNet settings, how to load it."""
    from safetensors import safe_open

    config = json.loads((Path(out) / "config.json").read_text())
    total = tempnet = 0
    dtypes = set()
    for file in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                n = int(torch.Size(part.get_shape()).numel())
                total += n
                tempnet += n if key.startswith("tempnet.") else 0
                dtypes.add(part.get_dtype())
    cls = (config.get("architectures") or ["?"])[0]
    how = ("AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)"
           if "auto_map" in config else "AutoModelForCausalLM.from_pretrained(DIR)")
    tn = f" (TempNet {_count(tempnet)})" if tempnet else ""
    return (f"wrote {out}: {cls}, {'/'.join(sorted(dtypes))}, {_count(total)} parameters{tn}, "
            f"{_tempnet_words(config.get('tempnet'))}; load with {how}")


def describe_checkpoint(path: Path) -> str:
    """One line on the checkpoint directory ``path`` written by a converter: model, vocabulary
    padding and layout, parameters, TempNet settings, how to use it."""
    from megatron.core import dist_checkpointing

    from megatron_tempnet.training.run_record import read_common_state, saved_padded_vocab

    common = read_common_state(path)
    record = common["config"]
    m, tp = record["model"], record["parallel"]["tp"]
    meta = dist_checkpointing.load_tensors_metadata(str(path))
    shapes = {k: v.global_shape for k, v in meta.items()}
    total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    tempnet = sum(int(torch.Size(s).numel()) for k, s in shapes.items() if "tempnet." in k)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in meta.values()})
    t = record["tempnet"] if record["tempnet"]["loss_mode"] != "ce" else None
    tn = f" (TempNet {_count(tempnet)})" if tempnet else ""
    return (f"wrote {path}: {m['family']} {m['num_layers']} layers, hidden {m['hidden_size']}, "
            f"vocabulary {m['vocab_size']} padded to {saved_padded_vocab(record)} (for TP={tp}), "
            f"{'/'.join(dtypes)}, {_count(total)} parameters{tn}, {_tempnet_words(t)}, "
            f"iteration {common['iteration']}, model weights only; use it with --load "
            f"{path.parent} --finetune (a new run) or evaluate it with python -m "
            f"megatron_tempnet.evaluate --load {path.parent}")

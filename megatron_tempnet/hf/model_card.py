"""The README.md (model card) of an export: architecture, temperature (TempNet settings),
training (from the checkpoint's record), evaluation (from ``python -m megatron_tempnet.evaluate
--metrics-jsonl``), how to load it, requirements and what ``.loss`` means."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_tempnet.config import ConfigError

LOSS_MODE_TAU = {
    "tempnet_dro": "TempNet's per-token tau (trained with the KL-DRO loss)",
    "tempnet_ce": "TempNet's per-token tau (trained with the tempered cross-entropy)",
    "dro_exact": ("the exact per-token tau* of the DRO loss: KL(p_tau || uniform) = rho, "
                  "solved from the logits at every step"),
}


def read_eval_jsonl(path: str, iteration: int | None = None) -> dict:
    """The metrics line of ``path`` (written by ``python -m megatron_tempnet.evaluate
    --metrics-jsonl``) for checkpoint ``iteration``, else its last line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--eval-jsonl {path}: no such file; write one with python -m "
                          "megatron_tempnet.evaluate --load CKPT ... --metrics-jsonl FILE")
    lines = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"--eval-jsonl {path}:{number}: not JSON ({e})") from e
        if isinstance(record, dict) and "ppl tau=1" in record:
            lines.append(record)
    if not lines:
        raise ConfigError(f"--eval-jsonl {path}: no line with evaluation metrics (\"ppl tau=1\"); "
                          "give the --metrics-jsonl file of python -m megatron_tempnet.evaluate")
    same = [r for r in lines if iteration is not None and r.get("iteration") == iteration]
    return (same or lines)[-1]


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**6 else f"{n / 1e6:,.2f} M"


def _rows(pairs) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in pairs if v is not None]


def _architecture(model, cfg) -> list[str]:
    tempnet = sum(p.numel() for n, p in model.named_parameters()
                  if n.startswith("tempnet.") or n == "pad_logit_weight")
    total = sum(p.numel() for p in model.parameters())
    family = {"llama": "LLaMA", "gpt": "GPT-2"}[cfg.family]
    return ["## Architecture", ""] + _rows([
        ("class", f"`{type(model).__name__}` ({family})"),
        ("layers / hidden / FFN", f"{cfg.num_layers} / {cfg.hidden_size} / {cfg.ffn_hidden_size}"),
        ("attention heads / query groups", f"{cfg.num_attention_heads} / {cfg.num_query_groups}"),
        ("vocabulary", f"{cfg.vocab_size} (padded to {cfg.padded_vocab_size()} in training)"),
        ("positions", cfg.max_position_embeddings),
        ("tied embeddings", cfg.tie_embeddings),
        ("parameters", _count(total - tempnet) + (f" + {_count(tempnet)} for the temperature "
                                                  "(TempNet, padded output rows)"
                                                  if tempnet else "")),
    ]) + [""]


def _temperature(tempnet_cfg) -> list[str]:
    if tempnet_cfg is None:
        return ["## Temperature", "",
                "A plain model (trained without a per-token temperature): its logits are the "
                "LM's; `generate()` samples at temperature 1 by default "
                "(generation_config.json).", ""]
    c = tempnet_cfg
    settings = [("loss mode", f"`{c.loss_mode}`"), ("tau bounds", f"[{c.tau_min}, {c.tau_max}]"),
                ("rho (KL radius)", c.rho if c.loss_mode != "tempnet_ce" else None)]
    if c.uses_tempnet:
        settings += [("TempNet design", f"`{c.arch}`"), ("TempNet width M", c.hidden_size),
                     ("input convention", f"`{c.input_convention}`" if c.arch == "paper"
                      else None),
                     ("initial tau", c.initial_tau if c.arch == "scale_aware" else None)]
    return ["## Temperature", "",
            "Every position's logits are divided by the model's own tau: "
            f"{LOSS_MODE_TAU[c.loss_mode]}, computed from the logits over the padded "
            "vocabulary as in training. The logits returned are already tempered, so "
            "`generate()` (which samples at temperature 1 by default, generation_config.json) "
            "samples at tau; greedy decoding is unchanged.",
            "",
            "- `model(ids, return_tau=True).tau`: tau per position.",
            "- `model.use_tempnet = False`: the plain logits (tau = 1), e.g. for a fixed "
            "`temperature=` in `generate()`.",
            "- `model(ids, labels=ids).loss`: the cross-entropy of the returned (tempered) "
            "logits, normalised over the tokenizer's vocabulary (training's tempered CE also "
            "counted the padded rows, never a label: it reads a little lower); "
            "`exp(loss)` is the perplexity at tau.",
            ""] + _rows(settings) + [""]


def _training(info: dict) -> list[str]:
    record = info.get("record") or {}
    train, parallel = record.get("train", {}), record.get("parallel", {})
    tempnet = record.get("tempnet", {})
    iteration, samples = info.get("iteration"), info.get("consumed_samples")
    tokens = samples * train["seq_length"] if samples and train.get("seq_length") else None
    pairs = [("checkpoint", f"`{info['source']}`" if info.get("source") else None),
             ("iteration", iteration if iteration is not None else None),
             ("planned iterations", train.get("train_iters")),
             ("samples seen", _count(samples) if samples else None),
             ("tokens seen", _count(tokens) if tokens else None),
             ("sequence length / global batch",
              f"{train['seq_length']} / {train['global_batch_size']}"
              if "seq_length" in train and "global_batch_size" in train else None),
             ("lr (peak / min, schedule)",
              f"{train['lr']} / {train.get('min_lr')}, {train.get('lr_decay_style')}"
              if "lr" in train else None),
             ("precision", train.get("precision")),
             ("training mode", tempnet.get("training_mode")),
             ("layout (TP / PP / DP)", "{} / {} / {}".format(*(parallel.get(k) for k in
                                                             ("tp", "pp", "dp")))
              if parallel else None),
             ("data", info.get("training_data") or "not recorded in the checkpoint")]
    return ["## Training", ""] + _rows(pairs) + [""]


def _evaluation(info: dict) -> list[str]:
    ev = info.get("evaluation")
    if not ev:
        return ["## Evaluation", "",
                "None given at export (`tools/convert_checkpoint_to_hf.py --eval-jsonl FILE`, "
                "FILE written by `python -m megatron_tempnet.evaluate --load CKPT ... "
                "--metrics-jsonl FILE`).", ""]
    lines = ["## Evaluation", "",
             f"`python -m megatron_tempnet.evaluate`, split `{ev.get('split', '?')}`, "
             f"checkpoint iteration {ev.get('iteration')}, {ev.get('eval tokens', 0):.0f} "
             f"tokens, top-1 accuracy {ev.get('accuracy', float('nan')):.4f}. Perplexity and "
             "expected calibration error (ECE, 15 bins):", "",
             "| temperature | ppl | ECE |", "|---|---|---|"]
    from megatron_tempnet.training.evaluate import eval_rows

    lines += [f"| {label} | {ppl:.4f} | {ece:.4f} |" for label, ppl, ece in eval_rows(ev)]
    iteration = info.get("iteration")
    if iteration is not None and ev.get("iteration") not in (None, iteration):
        lines += ["", f"Note: evaluated at iteration {ev.get('iteration')}, exported from "
                      f"iteration {iteration}."]
    return lines + [""]


def _usage(model, custom: bool) -> list[str]:
    remote = ", trust_remote_code=True" if custom else ""
    lm_args = ",trust_remote_code=True" if custom else ""
    return ["## How to load", "", "```python", "import torch",
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
            'path = "THIS_DIRECTORY"',
            f"tokenizer = AutoTokenizer.from_pretrained(path{remote})"
            + ("  # no code: this only skips a question" if custom else ""),
            f"model = AutoModelForCausalLM.from_pretrained(path{remote}, "
            "torch_dtype=torch.bfloat16,", '                                             '
            'device_map="auto")',
            'ids = tokenizer("The capital of France", return_tensors="pt").input_ids',
            "out = model.generate(ids.to(model.device), max_new_tokens=40)  # samples"
            + (" at tau" if custom else ""),
            "print(tokenizer.decode(out[0]))",
            f'generator = pipeline("text-generation", model=path{remote})', "```", "",
            "lm-evaluation-harness:", "", "```bash",
            f"lm_eval --model hf --model_args pretrained=THIS_DIRECTORY{lm_args} "
            "--tasks wikitext", "```", ""]


def _requirements(custom: bool) -> list[str]:
    from megatron_tempnet.hf.remote.configuration_tempnet import (TESTED_TORCH,
                                                                  TESTED_TRANSFORMERS,
                                                                  TESTED_WITH)

    if not custom:
        return []
    return ["## Requirements", "",
            f"torch >= {TESTED_TORCH[0]} and transformers >= {TESTED_TRANSFORMERS[0]}, < "
            f"{TESTED_TRANSFORMERS[1]} (requirements.txt; tested with {TESTED_WITH}), and "
            "accelerate for `device_map`. The model code in this directory "
            "(configuration_tempnet.py, modeling_tempnet.py, tempnet_math.py, written by "
            "megatron-tempnet; loaded with `trust_remote_code=True`) needs nothing else.", ""]


def _tokenizer(model, info: dict) -> list[str]:
    if not info.get("tokenizer"):
        return ["## Tokenizer", "", "None exported (give `--tokenizer-model`).", ""]
    c = model.config
    return ["## Tokenizer", "",
            f"A fast tokenizer (tokenizer.json) converted from `{Path(info['tokenizer']).name}`, "
            "giving the ids of training; it adds no special token: training documents had "
            f"no BOS and ended with the end-of-document token (id {c.eos_token_id}), which is "
            f"also `bos_token` (what precedes a document). pad id {c.pad_token_id}.", ""]


def model_card(model, cfg, tempnet_cfg, info: dict) -> str:
    """The README.md text; ``info``: source, iteration, consumed_samples, record (the
    checkpoint's run record), evaluation (a --metrics-jsonl line), training_data, dtype,
    tokenizer (all optional)."""
    from megatron_tempnet import __version__

    custom = tempnet_cfg is not None
    name = Path(info["source"]).name if info.get("source") else "megatron-tempnet model"
    tags = ["megatron-tempnet"] + (["tempnet", "custom_code"] if custom else [])
    dtype = str(info.get("dtype", "torch.float32")).replace("torch.", "")
    head = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:"] + [f"- {t}" for t in tags] + ["---", "",
            f"# {name}", "",
            f"A `{type(model).__name__}` exported by megatron-tempnet "
            f"{__version__} (tools/convert_checkpoint_to_hf.py), weights in {dtype}.", ""]
    parts = (head + _architecture(model, cfg) + _temperature(tempnet_cfg) + _training(info)
             + _evaluation(info) + _usage(model, custom) + _tokenizer(model, info)
             + _requirements(custom))
    return "\n".join(parts).rstrip() + "\n"

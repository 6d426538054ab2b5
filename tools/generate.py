#!/usr/bin/env python3
"""Generate text from an exported Hugging Face model directory (tools/convert_checkpoint_to_hf.py).

    python tools/generate.py --model-dir hf_out --prompt "def fib(n):" --max-new-tokens 40
    ... --temperature-mode tempnet      # the model's own per-step tau (default when it has one):
                                        # TempNet's, or the exact tau* of a dro_exact model
    ... --temperature-mode fixed --temperature 0.8
    ... --temperature-mode anneal --temperature 1.5 --final-temperature 0.5
    ... --temperature-mode entropy --entropy-temperature-base 1 --entropy-temperature-alpha 1
    ... --temperature-mode threshold --confidence-threshold 0.5 --confident-temperature 0.8 \
        --uncertain-temperature 1.5
    ... --temperature-mode ensemble --ensemble-temperatures 0.5 1 2
    ... --greedy                        # argmax (identical with or without TempNet)
    ... --show-tau                      # print each generated token with its tau

Models exported from loss modes "tempnet_dro" and "tempnet_ce" carry TempNet, "dro_exact" ones
solve tau* (KL(p_tau || u) = rho, megatron_tempnet/tempnet/exact_tau.py) at every step; "ce" and
"dro_fixed_tau" exports are plain models (fixed or annealed temperature only).

The temperature tools beside TempNet (megatron_tempnet/tempnet/temperature_tools.py,
docs/tempnet_math.md 5.1), for any model (its TempNet switched off, as for fixed / anneal):
entropy (T = base x (1 + alpha x H(p)/log V) per step, V = the scores' entries), threshold
(confident_temperature where max p >= confidence_threshold, else uncertain_temperature) and
ensemble (samples the mean of softmax(scores / T_k) over the ensemble temperatures). Their
flags and defaults are EvalConfig's (megatron_tempnet/training/config.py), the settings that
``python -m megatron_tempnet.evaluate`` reports them at.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_tempnet.hf.modeling  # noqa: E402,F401  (registers the TempNet Auto classes)
from megatron_tempnet.arguments import field_help  # noqa: E402
from megatron_tempnet.cli import run_command  # noqa: E402
from megatron_tempnet.config import ConfigError, coerce  # noqa: E402
from megatron_tempnet.data.tokenizers import load_tokenizer  # noqa: E402
from megatron_tempnet.tempnet.temperature_tools import (ensemble_log_probs,  # noqa: E402
                                                        token_temperatures)
from megatron_tempnet.training.config import TEMPERATURE_TOOLS, EvalConfig  # noqa: E402

# --temperature-mode of the temperature tools (training.config.TEMPERATURE_TOOLS: their settings)
TOOL_MODES = ("entropy", "threshold", "ensemble")


def check_model_dir(model_dir: Path) -> None:
    fix = "give a directory written by tools/convert_checkpoint_to_hf.py"
    if not model_dir.is_dir():
        raise ConfigError(f"--model-dir {model_dir}: no such directory; {fix}")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model-dir {model_dir}: no config.json in it; {fix}")


def find_tokenizer(model_dir: Path, override: str | None):
    if override:
        path = Path(override)
        if not path.is_file():
            raise ConfigError(f"--tokenizer {override}: no such file; give a SentencePiece "
                              ".model or tokenizers .json")
    else:
        path = next((model_dir / n for n in ("tokenizer.model", "tokenizer.json")
                     if (model_dir / n).exists()), None)
        if path is None:
            raise ConfigError(f"--model-dir {model_dir}: no tokenizer.model or tokenizer.json "
                              "in it; pass --tokenizer")
    kind = "huggingface" if path.suffix == ".json" else "sentencepiece"
    return load_tokenizer(kind, str(path))


class AnnealedTemperature:
    """LogitsProcessor dividing step t's scores by a temperature moving linearly start -> end."""

    def __init__(self, start: float, end: float, steps: int, prompt_len: int):
        self.start, self.end, self.steps, self.prompt_len = start, end, max(steps - 1, 1), prompt_len

    def __call__(self, input_ids, scores):
        t = min(input_ids.shape[1] - self.prompt_len, self.steps) / self.steps
        return scores / (self.start + (self.end - self.start) * t)


class ToolTemperature:
    """LogitsProcessor dividing each row of scores [b, V] by its per-token temperature from
    temperature_tools.token_temperatures: ``which`` "entropy" (the entropy-adaptive T) or
    "threshold" (confidence thresholding), at ``config``'s (EvalConfig's) settings."""

    def __init__(self, config: EvalConfig, which: str):
        self.config, self.which = config, which

    def __call__(self, input_ids, scores):
        temperature = getattr(token_temperatures(scores, self.config), self.which)
        return scores / temperature.unsqueeze(-1).to(scores.dtype)


class EnsembleTemperature:
    """LogitsProcessor turning scores into the log-probabilities of the multi-temperature
    ensemble, log mean_k softmax(scores / T_k) (sampled at temperature 1)."""

    def __init__(self, config: EvalConfig):
        self.temperatures = tuple(config.ensemble_temperatures)

    def __call__(self, input_ids, scores):
        return ensemble_log_probs(scores, self.temperatures)


def tool_processor(mode: str, config: EvalConfig):
    """The LogitsProcessor of temperature mode ``mode`` (one of TOOL_MODES)."""
    if mode == "ensemble":
        return EnsembleTemperature(config)
    return ToolTemperature(config, mode)


def add_tool_flags(parser: argparse.ArgumentParser) -> None:
    """The temperature tools' flags: EvalConfig's fields of the same names (evaluation's
    --entropy-temperature-base, ...), their help and defaults from its docstring and fields."""
    hints = typing.get_type_hints(EvalConfig)
    group = parser.add_argument_group("temperature tools (EvalConfig's fields; --temperature-mode "
                                      f"{', '.join(TOOL_MODES)})")
    for name in (n for fields in TEMPERATURE_TOOLS.values() for n in fields):
        is_list = typing.get_origin(hints[name]) is list
        group.add_argument("--" + name.replace("_", "-"), dest=f"tool.{name}",
                           nargs="+" if is_list else None, metavar=name.upper(),
                           default=argparse.SUPPRESS, help=field_help("eval", name))


def tool_config(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig with the given tool flags (each converted by its field's type), validated."""
    hints = typing.get_type_hints(EvalConfig)
    given = {key.split(".", 1)[1]: value for key, value in vars(args).items()
             if key.startswith("tool.")}
    return dataclasses.replace(EvalConfig(), **{
        name: coerce(value, hints[name], "--" + name.replace("_", "-"))
        for name, value in given.items()}).validate()


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", help="default: the tokenizer file in --model-dir")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature-mode", choices=("tempnet", "fixed", "anneal", *TOOL_MODES),
                   help="tempnet: the model's own per-step tau (TempNet's or dro_exact's tau*); "
                        f"{', '.join(TOOL_MODES)}: the temperature tools (below)")
    p.add_argument("--temperature", type=float, default=1.0, help="fixed, or the annealing start")
    p.add_argument("--final-temperature", type=float, default=0.5, help="annealing end")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-tau", action="store_true")
    add_tool_flags(p)
    args = p.parse_args(argv)
    tools = tool_config(args)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1: e.g. 50")
    if min(args.temperature, args.final_temperature) <= 0:
        raise ConfigError(f"--temperature {args.temperature} / --final-temperature "
                          f"{args.final_temperature} must be > 0: use --greedy for argmax")
    if not args.prompt:
        raise ConfigError("--prompt is empty: give the text to continue, e.g. --prompt 'Once'")

    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model_dir = Path(args.model_dir)
    check_model_dir(model_dir)
    tok = find_tokenizer(model_dir, args.tokenizer)
    prompt_ids = tok.tokenize(args.prompt)
    if not prompt_ids:
        raise ConfigError(f"--prompt {args.prompt!r} tokenizes to zero tokens; give text the "
                          "tokenizer encodes")
    ids = torch.tensor([prompt_ids])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    has_tempnet = hasattr(model, "use_tempnet")
    mode = args.temperature_mode or ("tempnet" if has_tempnet else "fixed")
    if mode == "tempnet" and not has_tempnet:
        raise ConfigError(f"--temperature-mode tempnet: {model_dir} has no per-token tau "
                          "(neither TempNet weights nor a dro_exact loss mode); use "
                          f"--temperature-mode fixed or anneal (or {', '.join(TOOL_MODES)})")
    if has_tempnet:
        model.use_tempnet = mode == "tempnet"
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, top_k=0,
                  top_p=1.0, output_scores=False, return_dict_in_generate=True,
                  pad_token_id=tok.eod)
    if mode == "fixed" and not args.greedy:
        kwargs["temperature"] = args.temperature
    if mode == "anneal" and not args.greedy:
        kwargs["logits_processor"] = LogitsProcessorList([AnnealedTemperature(
            args.temperature, args.final_temperature, args.max_new_tokens, ids.shape[1])])
    if mode in TOOL_MODES and not args.greedy:  # greedy: each keeps the argmax
        kwargs["temperature"] = 1.0
        kwargs["logits_processor"] = LogitsProcessorList([tool_processor(mode, tools)])
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(ids, **kwargs).sequences
    new = out[0, ids.shape[1]:].tolist()
    print(tok.detokenize(out[0].tolist()))  # decoded whole: pieces keep their spaces
    if args.show_tau and has_tempnet:
        with torch.no_grad():
            tau = model(out[:, :-1], return_tau=True).tau[0, ids.shape[1] - 1:]
        for token, t in zip(new, tau.tolist()):
            print(f"{tok.detokenize([token])!r:>20}  tau {t:.3f}")
    return 0


def main(argv=None) -> int:
    """_main; a bad input ends as one line ``error: ...`` and exit code 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

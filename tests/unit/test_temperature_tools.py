"""The temperature tools beside TempNet (tempnet/temperature_tools.py, docs/tempnet_math.md 5.1)
against the dense references of tests/temperature_reference.py (plain softmax, entropy and
mixture of softmaxes in float64); tools/generate.py's processors against the same references,
and each new --temperature-mode end to end on an exported tiny model; EvalConfig's checks of
their settings. (The evaluation's metrics: tests/unit/test_evaluate.py; at TP=2:
tests/parallel/test_evaluate_tp.py.)"""
import importlib.util
import math

import pytest
import torch

import temperature_reference as ref
from megatron_tempnet.config import ConfigError
from megatron_tempnet.tempnet.temperature_tools import (
    confidence_threshold_temperature, ensemble_log_probs, ensemble_nll_and_confidence,
    entropy_adaptive_temperature, mixture_log_prob, softmax_entropy_and_confidence,
    token_temperatures)
from megatron_tempnet.training.config import EvalConfig
from torchrun import REPO

# fp64 inputs: the same math in another order; fp32: rounding of sums over V ~ 100 entries
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
TOOLS = EvalConfig(entropy_temperature_base=0.7, entropy_temperature_alpha=1.5,
                   ensemble_temperatures=[0.4, 1.0, 2.5], confidence_threshold=0.3,
                   confident_temperature=0.6, uncertain_temperature=1.8)


def random_logits(seed, shape=(16, 8, 97), dtype=torch.float64, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_and_confidence_are_the_softmaxs(dtype, seed):
    z = random_logits(seed, dtype=dtype)
    z[0, 0, :40] = -math.inf  # masked entries add nothing (no 0 * inf = nan)
    entropy, confidence, vocab = softmax_entropy_and_confidence(z)
    h_ref, c_ref = ref.softmax_entropy_confidence(z)
    assert vocab == 97 and entropy.dtype == dtype and entropy.shape == (16, 8)
    torch.testing.assert_close(entropy, h_ref.to(dtype), **TOL[dtype], msg=f"seed {seed}")
    torch.testing.assert_close(confidence, c_ref.to(dtype), **TOL[dtype], msg=f"seed {seed}")
    assert float(c_ref.min()) < 0.3 < float(c_ref.max())  # the inputs span confidences
    # bf16 logits are computed in fp32
    h16, _, _ = softmax_entropy_and_confidence(z.to(torch.bfloat16))
    assert h16.dtype == torch.float32


def test_entropy_adaptive_temperature(seed):
    z = random_logits(seed)
    temps = token_temperatures(z, TOOLS)
    expected = ref.entropy_temperature(z, 0.7, 1.5)
    torch.testing.assert_close(temps.entropy, expected, **TOL[torch.float64], msg=f"seed {seed}")
    assert float(expected.std()) > 1e-3  # a per-token temperature
    # the ends: base at a one-hot softmax, base (1 + alpha) at the uniform one
    ends = torch.zeros(2, 50, dtype=torch.float64)
    ends[0, 3] = 1e4
    h, _, vocab = softmax_entropy_and_confidence(ends)
    torch.testing.assert_close(entropy_adaptive_temperature(h, vocab, 0.7, 1.5),
                               torch.tensor([0.7, 0.7 * 2.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="V >= 2"):
        entropy_adaptive_temperature(h, 1, 1.0, 1.0)


def test_confidence_threshold_temperature(seed):
    z = random_logits(seed)
    temps = token_temperatures(z, TOOLS)
    expected, confident = ref.threshold_temperature(z, 0.3, 0.6, 1.8)
    assert 0 < int(confident.sum()) < confident.numel(), f"seed {seed}"  # both levels occur
    torch.testing.assert_close(temps.threshold, expected)
    assert torch.equal(temps.confident, confident)
    c = torch.tensor([0.29, 0.3, 0.31], dtype=torch.float32)  # >= threshold is confident
    assert confidence_threshold_temperature(c, 0.3, 0.6, 1.8).tolist() == pytest.approx(
        [1.8, 0.6, 0.6])


def test_ensemble_nll_and_confidence_are_the_mixtures(seed):
    z = random_logits(seed, shape=(40, 97))
    y = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(seed + 1))
    temperatures = TOOLS.ensemble_temperatures
    members = torch.stack([torch.log_softmax(z / t, -1) for t in temperatures], -1)  # [t, V, K]
    nll_k = -members.gather(1, y.view(-1, 1, 1).expand(-1, 1, 3)).squeeze(1)  # [t, K]
    conf_k = members.exp().amax(1)  # [t, K]
    nll, conf = ensemble_nll_and_confidence(nll_k, conf_k)
    p_ens = ref.ensemble_probs(z, temperatures)
    torch.testing.assert_close(nll, -torch.log(p_ens.gather(1, y.view(-1, 1)).squeeze(1)),
                               **TOL[torch.float64], msg=f"seed {seed}")
    torch.testing.assert_close(conf, p_ens.amax(-1), **TOL[torch.float64], msg=f"seed {seed}")
    assert torch.equal(p_ens.argmax(-1), z.argmax(-1))  # correctness is unchanged
    # the mixture of one distribution is itself
    torch.testing.assert_close(mixture_log_prob(members[..., :1], -1), members[..., 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ensemble_log_probs(dtype, seed):
    scores = random_logits(seed, shape=(3, 97), dtype=dtype)
    out = ensemble_log_probs(scores, TOOLS.ensemble_temperatures)
    assert out.dtype == dtype
    torch.testing.assert_close(out.exp(), ref.ensemble_probs(scores, TOOLS.ensemble_temperatures)
                               .to(dtype), **TOL[dtype], msg=f"seed {seed}")


# --- tools/generate.py ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generate_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", REPO / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_processors_match_the_reference(generate_tool, seed):
    scores = random_logits(seed, shape=(4, 97), dtype=torch.float32)
    entropy = generate_tool.tool_processor("entropy", TOOLS)(None, scores)
    torch.testing.assert_close(entropy, (scores / ref.entropy_temperature(scores, 0.7, 1.5)
                                         .unsqueeze(-1)).float(), msg=f"seed {seed}")
    threshold = generate_tool.tool_processor("threshold", TOOLS)(None, scores)
    t_ref, confident = ref.threshold_temperature(scores, 0.3, 0.6, 1.8)
    torch.testing.assert_close(threshold, (scores / t_ref.unsqueeze(-1)).float())
    ensemble = generate_tool.tool_processor("ensemble", TOOLS)(None, scores)
    torch.testing.assert_close(torch.softmax(ensemble, -1), ref.ensemble_probs(
        scores, TOOLS.ensemble_temperatures).float(), rtol=2e-5, atol=2e-6, msg=f"seed {seed}")


def test_generate_tool_flags_are_evalconfigs(generate_tool):
    import argparse

    parser = argparse.ArgumentParser()
    generate_tool.add_tool_flags(parser)
    assert generate_tool.tool_config(parser.parse_args([])) == EvalConfig()
    cfg = generate_tool.tool_config(parser.parse_args(
        ["--ensemble-temperatures", "0.3", "3", "--confidence-threshold", "0.25",
         "--entropy-temperature-alpha", "0"]))
    assert (cfg.ensemble_temperatures, cfg.confidence_threshold,
            cfg.entropy_temperature_alpha) == ([0.3, 3.0], 0.25, 0.0)
    with pytest.raises(ConfigError, match="--ensemble-temperatures"):
        generate_tool.tool_config(parser.parse_args(["--ensemble-temperatures", "2"]))
    with pytest.raises(ConfigError, match="--confident-temperature 'warm'"):
        generate_tool.tool_config(parser.parse_args(["--confident-temperature", "warm"]))


def test_generate_runs_each_tool_mode(generate_tool, single_process, tmp_path, tokenizers,
                                      capsys, seed):
    """Each new --temperature-mode samples end to end from an exported TempNet model (TempNet
    switched off); at settings where a tool's temperature is the constant 0.7 it samples exactly
    what --temperature-mode fixed --temperature 0.7 samples; --greedy stays argmax."""
    from megatron_tempnet.config import load_model_preset
    from megatron_tempnet.hf.export import export_hf
    from megatron_tempnet.models.sharding import model_tensors
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.tempnet import TempNetConfig

    tok = tokenizers["sentencepiece"]
    cfg = load_model_preset("tiny-llama", vocab_size=tok.vocab_size)
    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=32, tau_min=0.3, tau_max=3.0)
    torch.manual_seed(seed)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=seed % 1000).eval()
    export_hf(str(tmp_path / "hf"), model_tensors(model), cfg, tcfg, tokenizer_file=tok.path)

    def generate(*flags):
        code = generate_tool.main(["--model-dir", str(tmp_path / "hf"), "--prompt", "The value",
                                   "--max-new-tokens", "6", "--seed", str(seed), *flags])
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        text = [line for line in out.out.splitlines() if line.startswith("The value")]
        assert len(text) == 1, out.out  # the prompt and its continuation, decoded
        return text[0]

    for mode in ("entropy", "threshold", "ensemble"):
        generate("--temperature-mode", mode)
    fixed = generate("--temperature-mode", "fixed", "--temperature", "0.7")
    assert generate("--temperature-mode", "entropy", "--entropy-temperature-base", "0.7",
                    "--entropy-temperature-alpha", "0") == fixed
    assert generate("--temperature-mode", "threshold", "--confident-temperature", "0.7",
                    "--uncertain-temperature", "0.7") == fixed
    greedy = generate("--greedy", "--temperature-mode", "fixed")
    assert generate("--greedy", "--temperature-mode", "ensemble") == greedy
    code = generate_tool.main(["--model-dir", str(tmp_path / "hf"), "--prompt", "The value",
                               "--temperature-mode", "threshold", "--confidence-threshold", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--confidence-threshold" in err and "(0, 1)" in err, err


# --- EvalConfig: the settings' one home ----------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("entropy_temperature_base", 0.0, "> 0"),
    ("entropy_temperature_alpha", -1.0, "> -1"),
    ("entropy_temperature_alpha", math.nan, "finite"),
    ("ensemble_temperatures", [1.0], "at least 2"),
    ("ensemble_temperatures", [0.5, -1.0], "each > 0"),
    ("confidence_threshold", 1.0, "(0, 1)"),
    ("confident_temperature", -0.5, "> 0"),
    ("uncertain_temperature", "hot", "finite number"),
])
def test_eval_config_refuses_bad_tool_settings(field, value, words):
    with pytest.raises(ConfigError) as err:
        EvalConfig(**{field: value}).validate()
    line = str(err.value)
    flag = "--" + field.replace("_", "-")
    assert "\n" not in line and f"EvalConfig.{field} ({flag})" in line and words in line, line
    assert repr(value) in line, line

"""Export to Hugging Face: the TempNet-aware classes give our model's logits and tau, and
generate() samples at TempNet's tau (greedy unchanged); without TempNet the export is plain."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_tempnet.config import load_model_preset
from megatron_tempnet.hf.export import export_hf
from megatron_tempnet.models.sharding import model_tensors
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
from megatron_tempnet.tempnet.config import TempNetConfig

ATOL = 2e-5  # fp32, different op order between megatron-core and transformers


def our_model(single_process, preset, loss_mode, seed, arch="paper", **tempnet):
    torch.manual_seed(seed)
    cfg = load_model_preset(preset, vocab_size=250)  # padded to 256: pad rows are exported
    tcfg = TempNetConfig(loss_mode=loss_mode, hidden_size=32, tau_min=0.3, tau_max=3.0,
                         arch=arch, **({"tau0": 0.8} if arch == "scale_aware" else {}),
                         **tempnet)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=seed).eval()
    with torch.no_grad():  # make pad rows, pooling / the output layer non-trivial
        for name, p in model.named_parameters():
            big = "pool" in name or "_out" in name or "w_feat" in name
            p.add_(torch.randn_like(p) * (0.5 if big else 0.02))
    return model, cfg, tcfg


@pytest.mark.parametrize("preset,arch", [("tiny-llama", "paper"), ("tiny-gpt", "paper"),
                                         ("tiny-llama", "scale_aware")])
def test_exported_tempnet_model_matches_ours(single_process, tmp_path, preset, arch, seed):
    model, cfg, tcfg = our_model(single_process, preset, "tempnet_dro", seed, arch)
    export_hf(str(tmp_path), model_tensors(model), cfg, tcfg)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__.startswith("TempNet") and hf.config.tempnet["tau_max"] == 3.0
    assert hf.config.tempnet["arch"] == arch and type(hf.tempnet) is type(model.tempnet)

    tokens = torch.randint(0, 250, (2, 19))
    with torch.no_grad():
        logits = model(tokens, torch.arange(19).expand(2, 19), None)  # [b, s, 256]
        tau = model.tempnet(logits)
        out = hf(tokens, return_tau=True)
    torch.testing.assert_close(out.tau, tau, atol=ATOL, rtol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(out.logits, logits[..., :250] / tau.unsqueeze(-1), atol=ATOL,
                               rtol=1e-5, msg=f"seed {seed}")

    prompt = tokens[:1, :5]
    greedy = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    hf.use_tempnet = False
    assert torch.equal(hf.generate(prompt, max_new_tokens=8, do_sample=False), greedy)
    samples = []
    for use in (False, True):
        hf.use_tempnet = use
        torch.manual_seed(0)
        samples.append(hf.generate(prompt.repeat(8, 1), max_new_tokens=12, do_sample=True,
                                   top_k=0, top_p=1.0))
    assert not torch.equal(samples[0], samples[1])  # tau != 1 changes what is sampled


def test_export_without_tempnet_is_plain(single_process, tmp_path):
    model, cfg, _ = our_model(single_process, "tiny-llama", "ce", 3)
    export_hf(str(tmp_path), model_tensors(model), cfg)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert "auto_map" not in hf.config.to_dict()  # no model code: nothing to trust
    assert not list(tmp_path.glob("*tempnet*.py")) and not (tmp_path / "requirements.txt").exists()
    assert "A plain model" in (tmp_path / "README.md").read_text()
    assert hf.generation_config.do_sample and hf.generation_config.temperature == 1.0
    tokens = torch.randint(0, 250, (2, 11))
    with torch.no_grad():
        ours = model(tokens, torch.arange(11).expand(2, 11), None)[..., :250]
        torch.testing.assert_close(hf(tokens).logits, ours, atol=ATOL, rtol=1e-5)


def test_generate_tool_modes(single_process, tmp_path, tokenizers):
    """tools/generate.py runs each temperature mode and shows tau per generated token."""
    import subprocess
    import sys

    from torchrun import REPO

    tok = tokenizers["sentencepiece"]
    model, cfg, tcfg = our_model(single_process, "tiny-llama", "tempnet_dro", 5)
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(5)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=5).eval()
    export_hf(str(tmp_path / "hf"), model_tensors(model), cfg, tcfg, tokenizer_file=tok.path)
    base = [sys.executable, "tools/generate.py", "--model-dir", str(tmp_path / "hf"),
            "--prompt", "The value", "--max-new-tokens", "5"]
    for extra in (["--show-tau"], ["--temperature-mode", "anneal", "--temperature", "1.5"]):
        out = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.startswith("The value"), out.stdout
        if extra == ["--show-tau"]:
            taus = [float(line.split("tau ")[1]) for line in out.stdout.splitlines()
                    if "tau " in line]
            assert len(taus) == 5 and all(0.3 <= t <= 3.0 for t in taus)


@pytest.mark.parametrize("loss_mode", ["tempnet_dro", "dro_exact"])
def test_loss_is_the_ce_of_the_returned_logits(single_process, tmp_path, loss_mode, seed):
    """``model(x, labels=y).loss`` is the CE of the tempered logits returned (labels shifted,
    -100 ignored): our model's tempered CE over the tokenizer's rows, not the tau = 1 CE."""
    import torch.nn.functional as F

    # rho 3 < log V and peaked logits: dro_exact's tau* inside the bounds
    model, cfg, tcfg = our_model(single_process, "tiny-llama", loss_mode, seed, rho=3.0)
    with torch.no_grad():
        model.output_layer.weight.mul_(20.0)
    export_hf(str(tmp_path), model_tensors(model), cfg, tcfg)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 250, (2, 21), generator=torch.Generator().manual_seed(seed))
    labels = tokens.clone()
    labels[1, 5:9] = -100
    with torch.no_grad():
        logits = model(tokens, torch.arange(21).expand(2, 21), None)  # [b, s, 256]
        tau = model.token_tau(logits)
        out = hf(tokens, labels=labels, return_tau=True)
        hf.use_tempnet = False
        plain = hf(tokens, labels=labels)
    keep = labels[:, 1:] != -100
    tempered = logits[:, :-1, :250] / tau[:, :-1, None]
    expected = F.cross_entropy(tempered[keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss, expected, atol=2e-5, rtol=1e-5, msg=f"seed {seed}")
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=1e-6)
    at_one = F.cross_entropy(logits[:, :-1, :250][keep], labels[:, 1:][keep])
    torch.testing.assert_close(plain.loss, at_one, atol=2e-5, rtol=1e-5)
    assert abs(out.loss - plain.loss) > 1e-3 and out.tau.std() > 1e-4
    as_tuple = hf(tokens, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.loss)


def test_export_generation_config_and_model_card(single_process, tmp_path, tokenizers):
    """generation_config.json samples at temperature 1 with the tokenizer's special ids; the
    model card tells the architecture, TempNet settings, training and evaluation."""
    import json

    from megatron_tempnet.hf.model_card import read_eval_jsonl
    from megatron_tempnet.training.evaluate import format_eval_table

    tok = tokenizers["huggingface"]
    torch.manual_seed(1)
    cfg = load_model_preset("tiny-gpt", vocab_size=tok.vocab_size)
    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=32, tau_min=0.3, tau_max=3.0,
                         arch="scale_aware", tau0=0.8, rho=4.0)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=1).eval()
    metrics = {"eval tokens": 4096.0, "accuracy": 0.25, "ppl tau=1": 30.5, "ece tau=1": 0.12,
               "ppl tempnet": 28.25, "ece tempnet": 0.03, "tau mean": 0.91, "tau std": 0.2,
               "best T": 0.95, "ppl best T": 29.0, "ece best T": 0.05,
               "ppl ensemble": 29.5, "ece ensemble": 0.04, "ppl entropy T": 29.75,
               "ece entropy T": 0.06, "entropy T mean": 1.25, "ppl threshold T": 29.9,
               "ece threshold T": 0.07, "threshold confident fraction": 0.5,
               "temperature tools": {"entropy_temperature_base": 1.0,
                                     "entropy_temperature_alpha": 1.0,
                                     "ensemble_temperatures": [0.5, 1.0, 2.0],
                                     "confidence_threshold": 0.5, "confident_temperature": 0.8,
                                     "uncertain_temperature": 1.5}}
    format_eval_table(metrics)  # the metrics evaluate writes
    lines = [{"split": "valid", "iteration": 100, **metrics, "ppl tempnet": 99.0},
             {"split": "valid", "iteration": 200, **metrics}, {"note": "not metrics"}]
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_eval_jsonl(str(jsonl), 200)["ppl tempnet"] == 28.25
    assert read_eval_jsonl(str(jsonl), 100)["ppl tempnet"] == 99.0
    assert read_eval_jsonl(str(jsonl), 7)["iteration"] == 200  # none of 7: the last
    record = {"train": {"seq_length": 64, "global_batch_size": 8, "train_iters": 300,
                        "lr": 3e-4, "min_lr": 3e-5, "lr_decay_style": "cosine",
                        "precision": "bf16"},
              "tempnet": {"training_mode": "scratch"}, "parallel": {"tp": 2, "pp": 1, "dp": 2}}
    out = tmp_path / "hf"
    export_hf(str(out), model_tensors(model), cfg, tcfg, tokenizer_file=tok.path,
              card={"source": "/ckpt/run7/iter_0000200", "iteration": 200,
                    "consumed_samples": 1600, "record": record,
                    "evaluation": read_eval_jsonl(str(jsonl), 200),
                    "training_data": "the demo corpus"})
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 1.0 and gen["top_k"] == 0
    assert gen["eos_token_id"] == gen["bos_token_id"] == tok.eod
    assert gen["pad_token_id"] == tok.pad_id
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.eod, tok.pad_id)
    card = (out / "README.md").read_text()
    for expected in ("`TempNetGPT2ForCausalLM` (GPT-2)", "| TempNet design | `scale_aware` |",
                     "| tau bounds | [0.3, 3.0] |", "| rho (KL radius) | 4.0 |",
                     "| initial tau | 0.8 |", "| iteration | 200 |",
                     "| tokens seen | 102,400 |", "| layout (TP / PP / DP) | 2 / 1 / 2 |",
                     "| data | the demo corpus |", "| tau = 1 | 30.5000 | 0.1200 |",
                     "| TempNet tau (mean 0.910) | 28.2500 | 0.0300 |",
                     "| best global T = 0.95 | 29.0000 | 0.0500 |",
                     "| ensemble T in {0.5, 1, 2} | 29.5000 | 0.0400 |",
                     "| entropy-adaptive T (base 1, a 1; mean 1.250) | 29.7500 | 0.0600 |",
                     "trust_remote_code=True",
                     "lm_eval --model hf", ".loss", "transformers >= 4.57"):
        assert expected in card, expected
    assert (out / "requirements.txt").read_text().startswith("torch>=")

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


def our_model(single_process, preset, loss_mode, seed, arch="paper"):
    torch.manual_seed(seed)
    cfg = load_model_preset(preset, vocab_size=250)  # padded to 256: pad rows are exported
    tcfg = TempNetConfig(loss_mode=loss_mode, hidden_size=32, tau_min=0.3, tau_max=3.0,
                         arch=arch, **({"tau0": 0.8} if arch == "scale_aware" else {}))
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
            taus = [float(line.split("tau ")[1]) for line in out.stdout.splitlines() if "tau " in line]
            assert len(taus) == 5 and all(0.3 <= t <= 3.0 for t in taus)

"""The model code a TempNet export carries (megatron_tempnet/hf/remote_code.py): its generated
tempnet_math.py computes the package's tau (both TempNet designs, the exact tau*), and a
process where megatron_tempnet, megatron-core, sentencepiece and protobuf cannot be imported
loads the export with plain transformers (``trust_remote_code=True``): the package's logits and
tau, the tokenizer's ids, sampling at tau, ``.loss``, fp16 / bf16 with ``device_map="auto"``,
``pipeline("text-generation")`` and save_pretrained / from_pretrained.

TEMPNET_EXTRA_TRANSFORMERS=DIR (a directory holding another transformers, e.g. installed with
``pip install --target DIR --no-deps transformers==4.57.6 "huggingface_hub<1" "tokenizers<0.23.1"``)
repeats the loading test with that version too."""
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tempnet.hf import remote_code
from megatron_tempnet.hf.export import export_hf
from megatron_tempnet.hf.modeling import tempnet_settings
from megatron_tempnet.models.sharding import model_tensors
from megatron_tempnet.tempnet.config import TempNetConfig
from megatron_tempnet.tempnet.exact_tau import solve_tau
from megatron_tempnet.tempnet.head import build_tempnet_head

ATOL = 2e-5  # fp32: megatron-core vs transformers


def load_export_code(directory: Path):
    """Import the three code files written into ``directory`` as a package; returns
    (tempnet_math, modeling_tempnet)."""
    remote_code.write_remote_code(directory)
    (directory / "__init__.py").touch()
    sys.path.insert(0, str(directory.parent))
    try:
        importlib.invalidate_caches()
        return (importlib.import_module(f"{directory.name}.tempnet_math"),
                importlib.import_module(f"{directory.name}.modeling_tempnet"))
    finally:
        sys.path.remove(str(directory.parent))


@pytest.mark.parametrize("arch", ["paper", "scale_aware"])
def test_generated_tempnet_equals_the_packages_head(tmp_path, arch, seed):
    tempnet_math, _ = load_export_code(tmp_path / f"code_{arch}_{seed}")
    assert not any("megatron" in line for line in
                   (tmp_path / f"code_{arch}_{seed}" / "tempnet_math.py").read_text().splitlines()
                   if line.startswith(("import ", "from ")))
    extra = {"tau0": 0.7} if arch == "scale_aware" else {"input_convention": "max_shifted"}
    cfg = TempNetConfig(loss_mode="tempnet_dro", arch=arch, hidden_size=16, tau_min=0.3,
                        tau_max=3.0, rho=3.0, dropout=0.0, **extra)
    vocab = 96
    torch.manual_seed(seed)
    ours = build_tempnet_head(cfg, vocab, seed=seed).eval()
    with torch.no_grad():  # a trained-looking head (the output layer of scale_aware is 0)
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    theirs = tempnet_math.build_head(tempnet_math.tempnet_config(tempnet_settings(cfg)), vocab)
    assert type(theirs).__name__ == type(ours).__name__
    assert {k: v.shape for k, v in theirs.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}
    theirs.load_state_dict(ours.state_dict(), strict=True)
    z = torch.randn(3, 7, vocab) * torch.tensor([0.5, 3.0, 12.0]).view(3, 1, 1)
    for dtype, atol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        with torch.no_grad():
            expected = ours.to(dtype)(z.to(dtype))
            got = theirs.to(dtype)(z.to(dtype))
        assert got.dtype == expected.dtype == dtype
        torch.testing.assert_close(got, expected, atol=atol, rtol=atol, msg=f"seed {seed}")
        assert expected.std() > 1e-3  # a per-token tau, not a constant


def test_generated_solve_tau_is_the_packages(tmp_path, seed):
    tempnet_math, _ = load_export_code(tmp_path / f"code_solve_{seed}")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 9, 300, generator=gen) * torch.tensor([0.05, 1.0, 4.0, 30.0]).view(4, 1, 1)
    for dtype in (torch.float32, torch.float64):
        expected = solve_tau(z.to(dtype), 2.0, 0.05, 5.0)
        got = tempnet_math.solve_tau(z.to(dtype), 2.0, 0.05, 5.0)
        assert torch.equal(got, expected), f"seed {seed}"  # the same source, the same ops
        inside = (expected > 0.05) & (expected < 5.0)
        assert inside.any() and not inside.all()  # interior roots and clamped rows


def test_generated_code_must_be_self_contained():
    source = remote_code.tempnet_math_source()
    remote_code.check_self_contained(source)
    with pytest.raises(RuntimeError, match=r"undefined names \['helper_not_copied'\]"):
        remote_code.check_self_contained(
            source + "\n\ndef f(x):\n    return helper_not_copied(x)\n")
    with pytest.raises(RuntimeError, match="imports megatron"):
        remote_code.check_self_contained(source + "\nimport megatron_tempnet\n")


# Run in a process where the package, megatron-core, sentencepiece and protobuf are absent.
CHILD = r'''
import json, os, sys
for name in ("megatron_tempnet", "megatron", "megatron.core", "sentencepiece",
             "google.protobuf"):
    sys.modules[name] = None  # import fails, importlib.util.find_spec says "not installed"
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

print("transformers", transformers.__version__)
for case in json.loads(sys.argv[1]):
    d, ref = case["dir"], torch.load(os.path.join(case["dir"], "..", "ref.pt"))
    config = AutoConfig.from_pretrained(d, trust_remote_code=True)
    assert type(config).__name__ == case["config_class"], type(config)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model).__name__ == case["model_class"], type(model)
    tokens = ref["tokens"]
    with torch.no_grad():
        out = model(tokens, return_tau=True)
    torch.testing.assert_close(out.tau, ref["tau"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref["logits"], atol=2e-5, rtol=1e-5)

    # .loss: the CE of the logits returned (tempered), -100 ignored
    labels = tokens.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        loss = model(tokens, labels=labels).loss
        model.use_tempnet = False
        plain = model(tokens, labels=labels).loss
        model.use_tempnet = True
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, ce, atol=1e-5, rtol=1e-5)
    assert abs(loss - plain) > 1e-3, (loss, plain)

    # generate() samples by default at temperature 1: at tau with TempNet, so it matters
    g = model.generation_config
    assert g.do_sample and g.temperature == 1.0 and g.top_k == 0 and g.top_p == 1.0, g
    prompt = tokens[:1, :4].repeat(6, 1)
    samples = []
    for use in (True, False):
        model.use_tempnet = use
        torch.manual_seed(0)
        samples.append(model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=10, min_new_tokens=10))
    model.use_tempnet = True
    assert samples[0].shape == (6, 14) and not torch.equal(samples[0], samples[1])
    assert int(samples[0].max()) < config.vocab_size

    for dtype in (torch.float16, torch.bfloat16):
        half = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, torch_dtype=dtype,
                                                    device_map="auto")
        with torch.no_grad():
            h = half(tokens, return_tau=True)
        assert half.dtype == dtype and h.logits.dtype == dtype and h.logits.isfinite().all()
        torch.testing.assert_close(h.tau.float(), ref["tau"], atol=0.05, rtol=0.05)

    if case.get("probe"):
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        assert tok.is_fast and tok.pad_token is not None, tok
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert getattr(tok, key) == getattr(config, key) == getattr(g, key), key
        assert tok.eos_token_id == case["eod"] and tok.bos_token_id == case["eod"]
        for text, ids in case["probe"]:
            got = tok(text)["input_ids"]
            assert got == ids, (text, got, ids)  # nothing added: no BOS, no EOS
            assert tok.decode(got) == case["decoded"][text], (text, tok.decode(got))
        gen = pipeline("text-generation", model=d, trust_remote_code=True)
        torch.manual_seed(0)
        text = gen("The value", max_new_tokens=6)[0]["generated_text"]
        assert text.startswith("The value") and len(text) > len("The value"), text

    saved = os.path.join(d, "..", "resaved")
    model.save_pretrained(saved)
    for name in ("configuration_tempnet.py", "modeling_tempnet.py", "tempnet_math.py"):
        assert os.path.exists(os.path.join(saved, name)), name
    again = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, out.logits, atol=0, rtol=0)
    print("OK", case["name"])
loaded = [m for m, v in sys.modules.items()
          if m.split(".")[0] in ("megatron_tempnet", "megatron", "sentencepiece")
          or m.startswith("google.protobuf")]
assert all(sys.modules[m] is None for m in loaded), loaded
'''


def export_case(single_process, tmp_path, name, preset, loss_mode, arch, tokenizer, seed):
    """Export one of our models (LLaMA at rotary base 5e5, whose default is 1e4) and save
    what the export must reproduce beside it."""
    from megatron_tempnet.config import load_model_preset
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model

    cfg = load_model_preset(preset, vocab_size=tokenizer.vocab_size if tokenizer else 250)
    cfg = dataclasses.replace(cfg, rotary_base=5e5)
    tcfg = TempNetConfig(loss_mode=loss_mode, hidden_size=32, tau_min=0.3, tau_max=3.0, rho=3.0,
                         arch=arch, **({"tau0": 0.8} if arch == "scale_aware" else {}))
    torch.manual_seed(seed)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=seed).eval()
    with torch.no_grad():  # pad rows, pooling / the output layer non-trivial
        for pname, p in model.named_parameters():
            big = "pool" in pname or "_out" in pname or "w_feat" in pname
            p.add_(torch.randn_like(p) * (0.5 if big else 0.02))
    out = tmp_path / name / "model"
    export_hf(str(out), model_tensors(model), cfg, tcfg,
              tokenizer_file=tokenizer.path if tokenizer else None)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens, torch.arange(17).expand(2, 17), None)
        tau = model.token_tau(logits)
    torch.save({"tokens": tokens, "tau": tau,
                "logits": logits[..., :cfg.vocab_size] / tau.unsqueeze(-1)},
               tmp_path / name / "ref.pt")
    case = {"name": name, "dir": str(out), "config_class": f"TempNet{_family(cfg)}Config",
            "model_class": f"TempNet{_family(cfg)}ForCausalLM"}
    if tokenizer is not None:
        texts = ["The value of x is 42.", "  two  spaces\tand a tab\n", "naïve café 🙂",
                 "</s> typed as text", "def f(n):\n    return n"]
        case.update(eod=tokenizer.eod,
                    probe=[[t, tokenizer.tokenize(t)] for t in texts],
                    decoded={t: tokenizer.detokenize(tokenizer.tokenize(t)) for t in texts})
    return case


def _family(cfg):
    return {"llama": "Llama", "gpt": "GPT2"}[cfg.family]


@pytest.fixture(scope="module")
def exports(single_process, tmp_path_factory, tokenizers):
    tmp = tmp_path_factory.mktemp("exports")
    return [export_case(single_process, tmp, "llama_paper_sp", "tiny-llama", "tempnet_dro",
                        "paper", tokenizers["sentencepiece"], 11),
            export_case(single_process, tmp, "gpt_scale_aware_bpe", "tiny-gpt", "tempnet_ce",
                        "scale_aware", tokenizers["huggingface"], 12),
            export_case(single_process, tmp, "llama_dro_exact", "tiny-llama", "dro_exact",
                        "paper", None, 13)]


def run_child(exports, tmp_path, pythonpath=None):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # from an empty directory: the repository (megatron_tempnet) is not on sys.path
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(exports)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for case in exports:
        assert f"OK {case['name']}" in proc.stdout
    return proc.stdout


def test_export_loads_without_the_package(exports, tmp_path):
    for case in exports:
        files = {p.name for p in Path(case["dir"]).iterdir()}
        assert set(remote_code.CODE_FILES) | {"requirements.txt", "README.md"} <= files, files
        config = json.loads((Path(case["dir"]) / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == \
            f"modeling_tempnet.{case['model_class']}"
    out = run_child(exports, tmp_path)
    assert "transformers" in out


@pytest.mark.skipif(not os.environ.get("TEMPNET_EXTRA_TRANSFORMERS"),
                    reason="set TEMPNET_EXTRA_TRANSFORMERS=DIR (another transformers) to run")
def test_export_loads_with_another_transformers(exports, tmp_path):
    out = run_child(exports, tmp_path, os.environ["TEMPNET_EXTRA_TRANSFORMERS"])
    print(out.splitlines()[0])

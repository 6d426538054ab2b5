"""lm-evaluation-harness on a TempNet export: ``lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True`` (run with megatron_tempnet and megatron-core not
importable) on a local rolling log-likelihood task (a YAML task reading a JSONL file through
``dataset_path: json``) gives the bits per byte that the package's own model computes for the
same texts at TempNet's tau (and not the tau = 1 value)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

TASK = "tempnet_local_bpb"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
# lm_eval's command line, in a process where the package cannot be imported
CHILD = """import sys
for name in ("megatron_tempnet", "megatron", "megatron.core"):
    sys.modules[name] = None
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
"""


def our_bits_per_byte(model, tokenizer, texts, vocab, tempered=True) -> float:
    """-sum log p(text) / ln 2 / sum bytes, each text scored after the end-of-document token
    (lm-eval's prefix token, the tokenizer's bos_token: what precedes a document in training)
    with the package's own model: softmax over the tokenizer's rows of logits / tau."""
    nll, nbytes = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.eod] + tokenizer.tokenize(text)])
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)  # [1, s, V_pad]
            tau = model.token_tau(logits) if tempered else torch.ones(ids.shape)
            logp = torch.log_softmax((logits[..., :vocab] / tau.unsqueeze(-1)).double(), -1)
        nll -= logp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
        nbytes += len(text.encode("utf-8"))
    return nll / nbytes / math.log(2)


def test_lm_eval_bits_per_byte_is_ours(single_process, tmp_path, tokenizers, corpus_docs):
    from transformers import AutoModelForCausalLM

    from megatron_tempnet.config import load_model_preset
    from megatron_tempnet.hf.export import export_hf
    from megatron_tempnet.models.sharding import model_tensors
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.tempnet.config import TempNetConfig

    tok = tokenizers["sentencepiece"]
    cfg = load_model_preset("tiny-llama", vocab_size=tok.vocab_size)
    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=32, tau_min=0.3, tau_max=3.0,
                         rho=3.0)
    torch.manual_seed(7)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=7).eval()
    with torch.no_grad():  # peaked logits (tau matters) and a non-trivial TempNet
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "pool" in name else 0.02))
        model.output_layer.weight.mul_(30.0)
    out = tmp_path / "model"
    export_hf(str(out), model_tensors(model), cfg, tcfg, tokenizer_file=tok.path)

    # texts that fit one window of the model (lm-eval's rolling windows are then one each)
    texts = [d for d in corpus_docs if 0 < len(tok.tokenize(d)) < 120][:5]
    texts.append("Grüße aus Köln, naïve café: 42 🙂")
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-c", CHILD, "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True,dtype=float32", "--tasks", TASK,
           "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "2",
           "--output_path", str(tmp_path / "results")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    bpb = results["results"][TASK]["bits_per_byte,none"]

    ours = our_bits_per_byte(model, tok, texts, cfg.vocab_size)
    assert bpb == pytest.approx(ours, rel=2e-5)
    assert abs(ours - our_bits_per_byte(model, tok, texts, cfg.vocab_size, tempered=False)) > 1e-2

    # the same number from the export's .loss (the CE of the tempered logits it returns)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    nll = 0.0
    for text in texts:
        ids = torch.tensor([[tok.eod] + tok.tokenize(text)])
        with torch.no_grad():
            nll += hf(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    assert nll / nbytes / math.log(2) == pytest.approx(ours, rel=2e-5)

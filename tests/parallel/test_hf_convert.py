"""Checkpoints <-> Hugging Face: a model trained at TP=2 (LLaMA, GQA) and one at PP=2 (GPT-2,
tied embeddings), both with TempNet, exported and loaded by transformers give the losses our
model measured in training (tau = 1 and with TempNet's tau), with training's token ids and a
model card of the run; HF -> ours -> HF is the identity; broken inputs fail clearly."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import megatron_tempnet.hf.modeling  # noqa: F401  (registers the TempNet Auto classes)
from megatron_tempnet.config import ConfigError, TrainConfig
from megatron_tempnet.data.tokenizers import load_tokenizer
from megatron_tempnet.hf.convert import checkpoint_to_hf, hf_to_checkpoint, load_checkpoint_full
from megatron_tempnet.hf.llama import to_hf
from torchrun import run_torchrun

pytestmark = pytest.mark.parallel
LOSS_RTOL = 2e-5  # fp32: megatron-core (TP/PP, SDPA) vs transformers (eager)


def hf_losses(model, batch):
    """Training's plain CE (tau = 1) and tempered CE, from the exported model alone.

    Training normalises over the padded vocabulary (Megatron keeps the padded rows in the
    softmax); the export drops those rows from lm_head but carries them as ``pad_logit_weight``
    for TempNet, so the padded logits vector of training is [logits | h @ pad_logit_weight^T]."""
    with torch.no_grad():
        model.use_tempnet = False
        logits = model(batch["tokens"]).logits
        hidden = model._lm_head_input
        z = torch.cat([logits, hidden @ model.pad_logit_weight.t()], dim=-1)
        tau = model.tau_from_logits(logits, hidden)
        model.use_tempnet = True
        tempered_logits = model(batch["tokens"]).logits
    torch.testing.assert_close(tempered_logits, logits / tau.unsqueeze(-1))
    labels = batch["labels"].flatten()
    return (F.cross_entropy(z.flatten(0, 1), labels).item(),
            F.cross_entropy((z / tau.unsqueeze(-1)).flatten(0, 1), labels).item())


def test_trained_tp2_and_pp2_models_export_to_transformers(single_process, tiny_corpus, tmp_path):
    from workers.hf_export_worker import probe_batch

    ranks = run_torchrun("hf_export_worker.py", tmp_path, tiny_corpus.data_prefix,
                         tiny_corpus.tokenizer_model, str(tmp_path / "ckpt"))
    batch = probe_batch()
    metrics = {"eval tokens": 512.0, "accuracy": 0.1, "ppl tau=1": 90.0, "ece tau=1": 0.2,
               "ppl tempnet": 80.0, "ece tempnet": 0.1, "tau mean": 1.1, "tau std": 0.1,
               "best T": 1.2, "ppl best T": 85.0, "ece best T": 0.15}
    eval_jsonl = tmp_path / "eval.jsonl"
    eval_jsonl.write_text(json.dumps({"split": "valid", "iteration": 3, **metrics}) + "\n")
    training = load_tokenizer("sentencepiece", tiny_corpus.tokenizer_model)
    for name, layout in (("llama", "2 / 1 / 1"), ("gpt", "1 / 2 / 1")):
        ours = next(r[name] for r in ranks if r[name] is not None)
        out = checkpoint_to_hf(str(tmp_path / "ckpt" / name), str(tmp_path / f"hf-{name}"),
                               tokenizer_file=tiny_corpus.tokenizer_model,
                               eval_jsonl=str(eval_jsonl))
        assert (out / "tokenizer.model").exists() and (out / "config.json").exists()
        assert (out / "tokenizer.json").exists() and (out / "modeling_tempnet.py").exists()
        card = (out / "README.md").read_text()
        for line in ("| iteration | 3 |", "| planned iterations | 3 |",
                     f"| layout (TP / PP / DP) | {layout} |", "| samples seen | 12 |",
                     "| tau = 1 | 90.0000 | 0.2000 |"):
            assert line in card, (name, line)
        tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        text = "Return the number of items, 42 of them."
        assert tok(text)["input_ids"] == training.tokenize(text)
        assert tok.eos_token_id == training.eod
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(model).__name__ == {"llama": "TempNetLlamaForCausalLM",
                                        "gpt": "TempNetGPT2ForCausalLM"}[name]
        plain, tempered = hf_losses(model, batch)
        assert plain == pytest.approx(ours["lm loss"], rel=LOSS_RTOL), name
        assert tempered == pytest.approx(ours["tempered ce"], rel=LOSS_RTOL), name
        assert abs(tempered - plain) > 1e-3  # TempNet's tau really is applied
        tempnet_round_trip(out, tmp_path / "ckpt" / name, tmp_path / name, tp=2)

    # a checkpoint directory with a shard file gone
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ckpt" / "llama", broken)
    it_dir = next(broken.glob("iter_*"))
    victim = next(p for p in it_dir.iterdir() if p.suffix == ".distcp")
    victim.unlink()
    with pytest.raises(ConfigError, match=f"missing shard file.*{victim.name}"):
        load_checkpoint_full(str(broken))


def tempnet_round_trip(exported, original, work, tp):
    """A TempNet export -> checkpoint (for TP=tp) -> export: the checkpoint holds the original
    tensors (TempNet's, the padded output rows TempNet reads) and settings, a --finetune load
    takes TempNet's weights from it, and the second export equals the first."""
    from safetensors.torch import load_file

    from megatron_tempnet.hf.convert import describe_checkpoint, describe_hf_dir
    from megatron_tempnet.hf.modeling import EXPORTED_TEMPNET_FIELDS
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.training.checkpoint_config import CheckpointConfig
    from megatron_tempnet.training.checkpointing import Checkpointer
    from megatron_tempnet.training.run_record import run_record

    path = hf_to_checkpoint(str(exported), str(work / "ckpt"), target_tp=tp)
    line = describe_checkpoint(path)
    assert "TempNet loss mode tempnet_dro" in line and "parameters (TempNet" in line, line
    want, cfg0, t0 = load_checkpoint_full(str(original))
    got, cfg, t = load_checkpoint_full(str(work / "ckpt"))
    assert {f: getattr(t, f) for f in EXPORTED_TEMPNET_FIELDS} == \
        {f: getattr(t0, f) for f in EXPORTED_TEMPNET_FIELDS}
    assert set(got) == set(want) and any(k.startswith("tempnet.") for k in got)
    for key, value in want.items():
        if key == "embedding.word_embeddings.weight" and not cfg.tie_embeddings:
            value, got[key] = value[:cfg.vocab_size], got[key][:cfg.vocab_size]  # never looked up
        assert torch.equal(got[key], value), key
    # --finetune from it into a TempNet run: TempNet's weights come from the checkpoint
    from megatron_tempnet.parallel import initialize
    ctx = initialize(1, 1, seed=0, environ={"MASTER_ADDR": "127.0.0.1"})
    model = build_tempnet_model(cfg, t, ctx)
    logs = []
    Checkpointer(CheckpointConfig(load=str(work / "ckpt"), finetune=True).validate(), [model],
                 None, None, ctx, run_record(cfg, t, TrainConfig(), ctx), log=logs.append).load()
    assert logs and "TempNet kept its init" not in logs[-1], logs
    for key, value in model.state_dict().items():
        if key.startswith("tempnet."):
            assert torch.equal(value, want[key]), key
    again = checkpoint_to_hf(str(work / "ckpt"), str(work / "hf"))
    assert "TempNet" in describe_hf_dir(again) and "trust_remote_code=True" in describe_hf_dir(
        again)
    first, second = (load_file(str(d / "model.safetensors")) for d in (exported, again))
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_hf_to_checkpoint_to_hf_is_identity(single_process, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ckpt"), make_vocab_size_divisible_by=64,
                     target_tp=2)
    full, cfg, _ = load_checkpoint_full(str(tmp_path / "ckpt"))
    assert full["embedding.word_embeddings.weight"].shape[0] == 384  # padded for TP=2: 128k
    back = to_hf(full, cfg)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for key, tensor in back.items():
        assert torch.equal(tensor, ref[key]), key


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="model_type 'bert' is not supported"):
        hf_to_checkpoint(str(tmp_path), str(tmp_path / "out"))

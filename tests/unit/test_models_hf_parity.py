"""Each model family gives the logits of its Hugging Face counterpart built from the same weights.

This pins the weight mapping (fused QKV per query group, SwiGLU gate/up, Conv1D transposes,
vocabulary padding) that checkpoint export and import use.
"""
import pytest
import torch

from megatron_tempnet.config import load_model_preset
from megatron_tempnet.hf import family_module
from megatron_tempnet.models.gpt import build_model
from megatron_tempnet.models.sharding import load_local, model_tensors

FP32_ATOL = 2e-5


def random_hf_model(family, cfg, seed):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = family_module(family).hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    model = (LlamaForCausalLM if family == "llama" else GPT2LMHeadModel)(hf_cfg).eval()
    with torch.no_grad():  # norms and biases random too, so a wrong mapping shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "ln" in name or "norm" in name else 0.0))
    return model


@pytest.mark.parametrize("preset,vocab", [("tiny-llama", 250), ("tiny-gpt", 250)])
def test_logits_match_huggingface(single_process, preset, vocab, seed):
    cfg = load_model_preset(preset, vocab_size=vocab)
    hf_model = random_hf_model(cfg.family, cfg, seed)
    conv = family_module(cfg.family)
    full = conv.from_hf(hf_model.state_dict(), cfg)

    model = build_model(cfg, single_process).eval()
    load_local(model, full)
    tokens = torch.randint(0, vocab, (3, 37))
    positions = torch.arange(37).expand(3, 37)
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., :vocab]
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=FP32_ATOL, rtol=1e-5)

    back = conv.to_hf(model_tensors(model), cfg)
    ref = hf_model.state_dict()
    for key, tensor in back.items():
        assert torch.equal(tensor, ref[key]), key

"""The SDPA layer spec (models/specs.py) against megatron-core's local spec, fp32, one process.

Same weights in both specs; forward logits and every parameter gradient must agree to fp32
round-off (the two differ only in how the softmax is evaluated: -10000 vs -inf masking, fused
vs separate scaling). tiny-llama has grouped-query attention (4 heads, 2 query groups) and RoPE;
tiny-gpt has multi-head attention, biases and learned positions. TP=2 coverage:
tests/parallel/test_model_parity.py builds through ``build_model``, whose default is this spec.
"""
import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_tempnet.config import ConfigError, load_model_preset
from megatron_tempnet.models.gpt import build_model
from megatron_tempnet.models.specs import SDPAttention

ATOL, RTOL = 2e-6, 1e-5  # fp32


def _pair(single_process, preset, **overrides):
    cfg = load_model_preset(preset, vocab_size=200, **overrides)
    torch.manual_seed(0)
    local = build_model(dataclasses.replace(cfg, attention_backend="local"), single_process)
    sdpa = build_model(dataclasses.replace(cfg, attention_backend="sdpa"), single_process)
    assert set(local.state_dict()) == set(sdpa.state_dict())  # checkpoints interchange
    with torch.no_grad():
        for p in local.parameters():  # random norms/biases so that every path shows
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    sdpa.load_state_dict(local.state_dict())
    return cfg, local, sdpa


def _batch(cfg, b=3, s=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    return tokens, torch.arange(s).expand(b, s).contiguous(), torch.roll(tokens, -1, 1)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt"])
def test_sdpa_spec_matches_local_spec(single_process, preset):
    cfg, local, sdpa = _pair(single_process, preset)
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert not isinstance(local.decoder.layers[0].self_attention.core_attention, SDPAttention)
    tokens, positions, labels = _batch(cfg)

    logits = [m(tokens, positions, None) for m in (local, sdpa)]
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=RTOL)

    for m in (local, sdpa):
        m.zero_grad()
        m(tokens, positions, None, labels=labels).mean().backward()
    for (name, p_local), (_, p_sdpa) in zip(local.named_parameters(), sdpa.named_parameters()):
        torch.testing.assert_close(p_sdpa.grad, p_local.grad, atol=ATOL, rtol=RTOL, msg=name)


def test_sdpa_explicit_mask_and_no_mask_match_local(single_process):
    """The core-attention modules alone: megatron's boolean mask (True = masked out), and
    attn_mask_type no_mask, with GQA at partition level (4 heads, 2 groups)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tempnet.models.gpt import transformer_config

    cfg = load_model_preset("tiny-llama", vocab_size=200)
    config = transformer_config(cfg, single_process)
    sq, b, n, g, hn = 7, 2, cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    q, k, v = torch.randn(sq, b, n, hn), torch.randn(sq, b, g, hn), torch.randn(sq, b, g, hn)
    mask = torch.rand(b, 1, sq, sq) > 0.6
    mask[..., 0] = False  # every query keeps one key
    for mask_type, m in [(AttnMaskType.padding, mask), (AttnMaskType.no_mask, None),
                         (AttnMaskType.causal, None)]:
        ref = DotProductAttention(config, 1, mask_type, "self")
        new = SDPAttention(config, 1, mask_type, "self")
        torch.testing.assert_close(new(q, k, v, m), ref(q, k, v, m), atol=ATOL, rtol=RTOL,
                                   msg=str(mask_type))


def test_sdpa_attention_dropout_train_vs_eval(single_process):
    cfg, local, sdpa = _pair(single_process, "tiny-llama", attention_dropout=0.5)
    tokens, positions, _ = _batch(cfg)
    sdpa.eval(), local.eval()
    torch.testing.assert_close(sdpa(tokens, positions, None), local(tokens, positions, None),
                               atol=ATOL, rtol=RTOL)
    sdpa.train()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = tracker.get_states()  # dropout draws from the tracker's stream: replay it
    a = sdpa(tokens, positions, None)
    tracker.set_states(saved)
    b = sdpa(tokens, positions, None)
    assert torch.equal(a, b)
    assert not torch.allclose(a, local(tokens, positions, None), atol=1e-3)


def test_unknown_attention_backend_is_an_error():
    cfg = load_model_preset("tiny-llama", vocab_size=200, attention_backend="flash")
    with pytest.raises(ConfigError, match="--attention-backend 'flash' is unknown"):
        cfg.validate()

"""Full state dict -> every rank's shards -> full again is the identity, at any TP x PP."""
import pytest
import torch

from megatron_tempnet.config import load_model_preset
from megatron_tempnet.hf import family_module
from megatron_tempnet.models.sharding import assemble_full, full_to_local


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)])
def test_shard_and_assemble_round_trip(preset, tp, pp):
    cfg = load_model_preset(preset, vocab_size=256)
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    hf_cls = LlamaForCausalLM if cfg.family == "llama" else GPT2LMHeadModel
    torch.manual_seed(0)
    full = family_module(cfg.family).from_hf(hf_cls(family_module(cfg.family).hf_config(cfg))
                                             .state_dict(), cfg)
    locals_ = {(p, t): full_to_local(full, cfg, t, tp, p, pp) for p in range(pp) for t in range(tp)}
    back = assemble_full(locals_, cfg, tp, pp)
    assert set(back) == set(full)
    for key in full:
        assert torch.equal(back[key], full[key]), key
    if cfg.family == "llama" and tp == 2:  # SwiGLU: each shard holds [gate_r; up_r]
        fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
        gate, up = fc1.chunk(2)
        shard = locals_[(0, 1)]["decoder.layers.0.mlp.linear_fc1.weight"]
        assert torch.equal(shard, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))

"""Activation recomputation keeps fewer activations: the bytes autograd saves for the backward
pass during one forward (``torch.autograd.graph.saved_tensors_hooks``: every tensor the graph
keeps, counted once per storage) of a LLaMA large enough that attention's [s, s] scores matter,
without recomputation, with --recompute-granularity selective and full (uniform / block)."""
import dataclasses

import pytest
import torch

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.models.gpt import build_model

SEQ, BATCH = 256, 2


def saved_bytes(model, tokens) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None,
                    labels=torch.roll(tokens, -1, 1))
    out.float().mean().backward()  # the recomputed graph still gives gradients
    return sum(storages.values())


@pytest.fixture(scope="module")
def measured(single_process):
    cfg = ModelConfig(family="llama", num_layers=4, hidden_size=128, num_attention_heads=8,
                      vocab_size=512, max_position_embeddings=SEQ)
    tokens = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    options = {"none": {}, "selective": {"recompute_granularity": "selective"},
               "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                        "recompute_num_layers": 1},
               "block": {"recompute_granularity": "full", "recompute_method": "block",
                         "recompute_num_layers": 2}}
    result = {}
    for name, extra in options.items():
        torch.manual_seed(0)
        model = build_model(cfg, single_process, options=extra)
        result[name] = saved_bytes(model, tokens)
    # megatron-core's unfused attention keeps the [b, n, s, s] scores (SDPA's CPU flash kernel
    # keeps only the log-sum-exp: selective recomputation has little to drop there)
    local = dataclasses.replace(cfg, attention_backend="local")
    for name in ("none", "selective"):
        torch.manual_seed(0)
        model = build_model(local, single_process, options=options[name])
        result[f"{name} local"] = saved_bytes(model, tokens)
    return result


def test_recomputation_keeps_fewer_activations(measured):
    none, selective, full, block = (measured[k] for k in ("none", "selective", "full", "block"))
    scores = 4 * BATCH * 8 * SEQ * SEQ * 4  # the attention probabilities of 4 layers, fp32
    dropped = measured["none local"] - measured["selective local"]
    assert dropped >= 0.9 * scores, measured  # selective drops the [s, s] scores
    assert selective <= none, measured
    print(measured)
    assert full < 0.35 * none, measured  # full keeps little beyond each layer's input
    assert full < block < none, measured  # block: half the layers recomputed

"""FLOPs accounting (training/flops.py) against a hand count of every GEMM for LLaMA-2 7B."""
import math

import pytest
import torch

from megatron_tempnet.config import load_model_preset
from megatron_tempnet.training.flops import (flops_per_token, memory_metrics, peak_flops,
                                             throughput_metrics)


def hand_count_llama2_7b(s=4096):
    """Forward GEMMs of one token, written out: L = 32, h = 4096, 32 heads of 128 (MHA),
    ffn 11008 (SwiGLU), V = 32000; training = 3x forward."""
    h, layers, f, v = 4096, 32, 11008, 32000
    q_proj = k_proj = v_proj = o_proj = 2 * h * h
    scores, weighted_values = 2 * s * h, 2 * s * h  # QK^T and AV over the full s x s
    gate = up = down = 2 * h * f
    layer = q_proj + k_proj + v_proj + o_proj + scores + weighted_values + gate + up + down
    return 3 * (layers * layer + 2 * h * v)


def test_llama2_7b_matches_hand_count_and_6n_rule():
    cfg = load_model_preset("llama2-7b")
    assert cfg.padded_vocab_size() == 32000
    got = flops_per_token(cfg, 4096)
    assert got == hand_count_llama2_7b()
    # 6 * N (all matmul parameters, LM head included, 6.74e9 minus the input embedding)
    # + 12 * L * s * h attention
    n_matmul = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4096 * 32000
    assert got == 6 * n_matmul + 12 * 32 * 4096 * 4096
    assert math.isclose(got, 4.608e10, rel_tol=1e-3)  # ~46 GFLOP per trained token
    # causal discount halves only the score GEMMs; forward-only is a third
    assert got - flops_per_token(cfg, 4096, causal=True) == 6 * 32 * 4096 * 4096
    assert flops_per_token(cfg, 4096, forward_only=True) * 3 == got


def test_gqa_and_tempnet_terms():
    base = load_model_preset("llama2-7b")
    gqa = load_model_preset("llama2-7b", num_query_groups=8)
    d = 128
    # K and V projections shrink from h x h to h x (g * d) each
    saved = 3 * 32 * 2 * 2 * 4096 * (4096 - 8 * d)
    assert flops_per_token(base, 4096) - flops_per_token(gqa, 4096) == saved
    m, v = 256, 32000
    with_head = flops_per_token(base, 4096, tempnet_hidden=m)
    assert with_head - flops_per_token(base, 4096) == 2 * (2 * m * v) + 3 * (2 * m * m)
    frozen_head = flops_per_token(base, 4096, tempnet_hidden=m, tempnet_trains=False)
    assert frozen_head - flops_per_token(base, 4096) == 2 * m * v + 2 * m * m
    frozen_lm = flops_per_token(base, 4096, tempnet_hidden=m, lm_trains=False)
    assert frozen_lm == flops_per_token(base, 4096, forward_only=True) + with_head - \
        flops_per_token(base, 4096)
    gpt = load_model_preset("gpt2-125m", vocab_size=50257)  # GeLU MLP: two GEMMs
    h, f = gpt.hidden_size, gpt.ffn_hidden_size
    assert flops_per_token(gpt, 1024) == 3 * (gpt.num_layers * (8 * h * h + 4 * 1024 * h
                                                                 + 4 * h * f)
                                              + 2 * h * gpt.padded_vocab_size())


def test_throughput_peak_and_memory():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), peak_tflops=100.0) == 1e14
    m = throughput_metrics(1000.0, 1e9, 2, None)
    assert m == {"tokens/s": 1000.0, "TFLOP/s/GPU": 0.5} and "MFU" not in m
    m = throughput_metrics(1000.0, 1e12, 1, 989e12)
    assert math.isclose(m["MFU"], 1.0 / 0.989)
    mem = memory_metrics(torch.device("cpu"))
    assert set(mem) == {"mem rss GiB", "mem max rss GiB"} and 0 < mem["mem rss GiB"] < 1024


@pytest.mark.gpu
def test_cuda_peak_and_memory():
    dev = torch.device("cuda", 0)
    assert peak_flops(dev) >= 1e14 and peak_flops(dev, "fp32") == peak_flops(dev) / 2
    assert set(memory_metrics(dev)) == {"mem max allocated GiB", "mem max reserved GiB"}

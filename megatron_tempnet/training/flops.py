"""Model FLOPs per token, achieved TFLOP/s per device, MFU and memory.

FLOPs: Megatron-LM's ``num_floating_point_operations`` accounting (Narayanan et al. 2021,
arXiv 2104.04473, appendix "floating-point operation accounting"), which handles grouped-query
attention and SwiGLU: only GEMMs count, 2 FLOPs per multiply-add, and every GEMM runs 3 times in
training (forward, data-gradient, weight-gradient). Per token, with L layers, hidden h,
n heads of size d (query width q = n*d), g query groups, ffn width f, padded vocabulary V,
sequence length s:

    attention projections  3 * 2 * L * h * (q + 2 * g * d)    (QKV)  + 3 * 2 * L * q * h (out)
    attention scores       3 * 2 * 2 * L * s * q              (QK^T and AV, full s x s: the
                           causal mask is NOT discounted, as in Megatron-LM's formula; pass
                           ``causal=True`` to halve it, PaLM/FlashAttention-style)
    MLP                    3 * 2 * L * h * f * (3 if SwiGLU else 2)
    logits (LM head)       3 * 2 * h * V
    TempNet                2 * M * V (W1) + 2 * M * M (W2) forward; when TempNet trains, W1
                           twice (its input is detached: no data gradient), W2 three times
                           (the head: docs/tempnet_math.md section 2.2)

Norms, softmax, the loss and the embedding lookup are not counted (the usual convention).
For equal numbers of query and KV heads this is 6 * N_nonembedding + 6 * h * V + 12 * L * s * h,
i.e. the 6N + attention rule of docs/gpu_baselines.md; ``forward_only`` counts one pass
(factor 1 instead of 3).

MFU = achieved model FLOP/s per device / peak. Peaks (dense, no sparsity): bf16/fp16 tensor-core
peaks of H100/H200 SXM (989 TFLOP/s), A100 (312); fp32 runs use the TF32 peak (half of those).
The peak is overridable (``peak_tflops``); unknown GPUs use the H100 value; CPU has no peak
(TFLOP/s only, no MFU).
"""
from __future__ import annotations

import os
import resource

import torch

from megatron_tempnet.config import ModelConfig

# bf16 / fp16 dense tensor-core peaks, TFLOP/s, matched by substring of the device name
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}
DEFAULT_PEAK_BF16_TFLOPS = 989.0  # H100 SXM


def layer_forward_flops(cfg: ModelConfig, seq_length: int, causal: bool = False):
    """(one transformer layer's forward FLOPs per token, of which the attention scores)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    mlp_gemms = 3 if cfg.family == "llama" else 2  # SwiGLU: gate, up, down
    scores = 2 * 2 * seq_length * q * (0.5 if causal else 1.0)
    return 2 * h * (q + 2 * kv) + 2 * q * h + scores + 2 * h * f * mlp_gemms, scores


def flops_per_token(cfg: ModelConfig, seq_length: int, *, vocab_size: int | None = None,
                    tempnet_hidden: int | None = None, tempnet_trains: bool = True,
                    lm_trains: bool = True, causal: bool = False,
                    forward_only: bool = False) -> float:
    """Model FLOPs per trained token (see the module docstring for the accounting).

    vocab_size: the padded vocabulary in the logits (default ``cfg.padded_vocab_size()``);
    tempnet_hidden: TempNet's M when the model has TempNet (None: no TempNet);
    lm_trains=False: a frozen LM (training mode frozen_lm) runs its forward pass only.
    """
    vocab = vocab_size if vocab_size is not None else cfg.padded_vocab_size()
    per_layer, _ = layer_forward_flops(cfg, seq_length, causal)
    lm_passes = 3 if lm_trains and not forward_only else 1
    total = lm_passes * (cfg.num_layers * per_layer + 2 * cfg.hidden_size * vocab)
    if tempnet_hidden:
        m, trains = tempnet_hidden, tempnet_trains and not forward_only
        # W1 reads the detached logits: forward + weight gradient; W2's input carries the
        # gradient on to W1: forward + data + weight gradient
        total += 2 * m * vocab * (2 if trains else 1) + 2 * m * m * (3 if trains else 1)
    return float(total)


def peak_flops(device: torch.device, precision: str = "bf16",
               peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``peak_tflops`` if given, else the table (module docstring);
    None on CPU (no MFU)."""
    if peak_tflops is not None:
        return float(peak_tflops) * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    bf16 = next((v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                 if k in name), DEFAULT_PEAK_BF16_TFLOPS)
    return bf16 * 1e12 * (0.5 if precision == "fp32" else 1.0)


def throughput_metrics(tokens_per_s: float, flops_per_tok: float, num_devices: int,
                       peak: float | None) -> dict:
    """{"tokens/s", "TFLOP/s/GPU"[, "MFU"]}: model FLOPs achieved per device over the window
    (``tokens_per_s`` is the global token rate; ``num_devices`` the world size)."""
    achieved = tokens_per_s * flops_per_tok / max(num_devices, 1)
    out = {"tokens/s": float(tokens_per_s), "TFLOP/s/GPU": achieved / 1e12}
    if peak:
        out["MFU"] = achieved / peak
    return out


def memory_metrics(device: torch.device) -> dict:
    """Peak memory in GiB: CUDA max allocated / reserved on a GPU; process RSS (current and
    peak) on CPU."""
    gib = float(1 << 30)
    if torch.device(device).type == "cuda":
        return {"mem max allocated GiB": torch.cuda.max_memory_allocated(device) / gib,
                "mem max reserved GiB": torch.cuda.max_memory_reserved(device) / gib}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib  # Linux: KiB
    try:
        import psutil

        rss = psutil.Process(os.getpid()).memory_info().rss / gib
    except ImportError:  # psutil is optional: the peak alone
        rss = peak
    return {"mem rss GiB": rss, "mem max rss GiB": peak}

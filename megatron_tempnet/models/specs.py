"""Transformer layer specs: megatron-core's local spec with PyTorch SDPA as the core attention.

megatron-core's local spec (no Transformer Engine) computes attention unfused: it materialises
the [b, n/tp, s, s] scores (baddbmm), a masked softmax and a second bmm. On an H100 this is the
main gap to Hugging Face's SDPA LLaMA (docs/gpu_baselines.md: 433 vs 204.6 ms per step, 1.36B
shape). :class:`SDPAttention` keeps everything of megatron-core's ``DotProductAttention`` (its
constructor: heads and query groups per TP partition, softmax scale, dropout probability;
its checkpoint entries) and replaces only ``forward`` with
``torch.nn.functional.scaled_dot_product_attention``, which picks the flash or memory-efficient
kernel on a GPU and the exact math kernel on the CPU.

Specs by name (``layer_spec`` in models/gpt.py picks one; both with :class:`TorchNorm`):

| name  | core attention                              | used                               |
|-------|---------------------------------------------|------------------------------------|
| sdpa  | :class:`SDPAttention` (this module)         | default without Transformer Engine |
| local | megatron-core ``DotProductAttention``       | explicit choice (reference)        |

Supported: causal self-attention (``is_causal``), an explicit boolean mask (megatron's
convention, True = masked out), grouped-query attention (``enable_gqa``: key/value heads are
shared by consecutive query heads, the same order as megatron's ``repeat_interleave``), any TP
size (heads per partition), attention dropout (drawn inside megatron's RNG-tracker fork, as the
local spec does). Not supported (an error at construction names the alternative): sliding
windows, softmax types other than "vanilla", packed sequences and attention bias (also refused
by the local spec).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention



class SDPAttention(DotProductAttention):
    """megatron-core ``DotProductAttention`` computed by ``F.scaled_dot_product_attention``.

    Same interface as the local core attention: query [sq, b, np, hn], key/value
    [sk, b, ng, hn] (np, ng: query heads and query groups of this TP partition) -> context
    [sq, b, np * hn].
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if self.config.softmax_type != "vanilla":
            raise NotImplementedError(
                f"SDPA core attention supports softmax_type 'vanilla' only, got "
                f"{self.config.softmax_type!r}: use the 'local' attention backend")
        if is_layer_window_attention(self.config.window_size, self.config.window_attn_skip_freq,
                                     layer_number):
            raise NotImplementedError("SDPA core attention has no sliding window: use the "
                                      "'local' attention backend")
        # The local path divides the scale by the layer number for fp16 stability
        # (apply_query_key_layer_scaling) and multiplies it back inside its softmax: the net
        # scale is the one SDPA takes.
        self.sdpa_scale = self.softmax_scale * (
            self.layer_number if self.config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None, "packed sequences need the Transformer Engine spec"
        assert attention_bias is None, "attention bias is not supported by SDPA core attention"
        sq, b, heads, hn = query.shape
        sk = key.shape[0]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type

        # mask: megatron's boolean mask marks positions to DROP; SDPA's marks positions to KEEP.
        # Without a mask, causal attention is generated (as the local spec does), except for a
        # single query (decoding), which attends to every key.
        attn_mask, is_causal = None, False
        if attention_mask is not None:
            attn_mask = ~attention_mask.bool()
        elif mask_type == AttnMaskType.causal and sq > 1:
            assert sq == sk, "causal attention without a mask needs sq == sk"
            is_causal = True

        # [s, b, n, hn] -> [b, n, s, hn] (views; the head dim stays contiguous)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.attention_dropout.p if self.training else 0.0
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.sdpa_scale, enable_gqa=gqa)

        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # as DotProductAttention
                context = attend()
        else:
            context = attend()
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


class TorchNorm:
    """PyTorch's LayerNorm / RMSNorm (per ``config.normalization``), as megatron-core's
    ``WrappedTorchNorm``, but sequence-parallel aware: with ``config.sequence_parallel`` each
    tensor-parallel rank normalises its slice of the sequence, so its weight and bias gradients
    are partial sums; marked ``sequence_parallel``, megatron-core's ``finalize_model_grads``
    all-reduces them over the tensor-parallel group (what apex's and TE's norms do on a GPU)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise NotImplementedError(f"normalization {config.normalization!r}: only "
                                      f"{sorted(kinds)} are supported")
        norm = kinds[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def local_layer_spec(normalization: str = "LayerNorm", sdpa: bool = True):
    """megatron-core's local GPT layer spec with :class:`TorchNorm` norms and, with ``sdpa``,
    :class:`SDPAttention` as core attention (else megatron-core's DotProductAttention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization=normalization)  # a fresh spec per call
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    if sdpa:
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


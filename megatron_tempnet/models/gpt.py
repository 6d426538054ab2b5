"""GPT (GPT-2 style) and LLaMA as megatron-core ``GPTModel`` configurations plus layer specs.

The two families differ only in configuration:

| family | positions        | norm      | MLP            | biases | output layer |
|--------|------------------|-----------|----------------|--------|--------------|
| gpt    | learned absolute | LayerNorm | GeLU (tanh)    | yes    | tied (opt.)  |
| llama  | RoPE             | RMSNorm   | SwiGLU         | no     | untied       |

Parallelism is applied from outside: the builder takes a :class:`ParallelContext` and builds this
rank's pipeline stage with its tensor-parallel shards.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron_tempnet.config import ModelConfig
from megatron_tempnet.parallel.runtime import ParallelContext

gelu_tanh = functools.partial(F.gelu, approximate="tanh")


def transformer_config(cfg: ModelConfig, parallel: ParallelContext,
                       params_dtype: torch.dtype = torch.float32, **extra):
    """megatron-core TransformerConfig for a model config on a parallel layout."""
    from megatron.core.transformer import TransformerConfig

    llama = cfg.family == "llama"
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=llama,
        activation_func=F.silu if llama else gelu_tanh,
        add_bias_linear=not llama,
        add_qkv_bias=not llama,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=parallel.tp_size,
        pipeline_model_parallel_size=parallel.pp_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        # Loss = sum over tokens / tokens in the global batch (exact across micro-batches and
        # data-parallel ranks; megatron-core's finalize_model_grads divides by the token count).
        calculate_per_token_loss=True,
        **extra,
    )


def layer_spec(cfg: ModelConfig, use_transformer_engine: bool | None = None):
    """Transformer Engine spec when importable on a GPU; otherwise megatron-core's local spec
    with ``cfg.attention_backend`` as core attention: "sdpa" (PyTorch SDPA, models/specs.py) or
    "local" (megatron-core's unfused DotProductAttention), and the norms of models/specs.py
    (sequence-parallel aware)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_tempnet.models.specs import local_layer_spec

    if use_transformer_engine is None:
        use_transformer_engine = torch.cuda.is_available() and _te_importable()
    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    norm = "RMSNorm" if cfg.family == "llama" else "LayerNorm"
    return local_layer_spec(norm, sdpa=cfg.attention_backend == "sdpa")


def scale_options(parallel_cfg, train_cfg) -> dict:
    """The TransformerConfig options of a run's parallel layout and memory settings
    (ParallelConfig: sequence parallelism, virtual pipeline; TrainConfig: recomputation).

    The interleaved schedule on 2 pipeline ranks sends activations and gradients between the
    same two ranks at once; megatron-core's batched point-to-point calls would post them in an
    order that pairs a gradient with an activation receive (tensors of one shape: silently
    wrong, measured on gloo), so there the unbatched calls (one communicator per direction) are
    used."""
    vp = parallel_cfg.virtual_size
    interleaved_on_two = vp > 1 and parallel_cfg.pipeline_model_parallel_size == 2
    return dict(sequence_parallel=parallel_cfg.sequence_parallel,
                virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
                batch_p2p_comm=not interleaved_on_two,
                recompute_granularity=train_cfg.recompute_granularity,
                recompute_method=train_cfg.recompute_method,
                recompute_num_layers=train_cfg.recompute_num_layers)


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def block_spec(layer, config, vp_stage: int | None):
    """The transformer block of this stage (or model chunk): ``layer`` repeated, and the final
    norm of models/specs.py."""
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from megatron_tempnet.models.specs import TorchNorm

    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=TorchNorm)


def build_model(cfg: ModelConfig, parallel: ParallelContext, *,
                params_dtype: torch.dtype = torch.float32, use_transformer_engine=None,
                model_cls=None, options: dict | None = None, vp_stage: int | None = None,
                **model_kwargs):
    """This rank's stage of the model (first stage embeds, last stage has the output layer);
    with the interleaved pipeline, its model chunk ``vp_stage``. ``options``: TransformerConfig
    options (:func:`scale_options`)."""
    from megatron.core.models.gpt import GPTModel

    cfg.validate(parallel.tp_size, parallel.pp_size)
    model_cls = model_cls or GPTModel
    config = transformer_config(cfg, parallel, params_dtype, **(options or {}))
    first, last = parallel.is_first_stage, parallel.is_last_stage
    if config.virtual_pipeline_model_parallel_size:  # chunk v of pipeline rank r holds
        vp = config.virtual_pipeline_model_parallel_size  # virtual stage v * pp + r
        first, last = first and vp_stage == 0, last and vp_stage == vp - 1
    if use_transformer_engine is None:
        use_transformer_engine = torch.cuda.is_available() and _te_importable()
    spec = layer_spec(cfg, use_transformer_engine)
    if not use_transformer_engine:  # the final norm too is ours (TransformerBlock's default
        spec = block_spec(spec, config, vp_stage)  # torch norm refuses sequence parallelism)
    model = model_cls(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size(parallel.tp_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=first,
        post_process=last,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope" if cfg.family == "llama" else "learned_absolute",
        rotary_base=cfg.rotary_base,
        **model_kwargs,
    )
    return model.to(parallel.device)

"""Parameters, memory per GPU and FLOPs per step of a run layout (``tools/estimate.py``).

Everything here is arithmetic on the configuration dataclasses (no torch, no megatron-core), so
it answers "does this layout fit in 80 GB?" before a job is queued. What is exact and what is a
model (tests/unit/test_estimate.py checks the exact parts against built models):

* Parameters: exact for megatron-core's ``GPTModel`` as ``models.gpt.build_model`` builds it
  (local or Transformer Engine spec: the same tensors), per TP rank and PP stage, with the
  vocabulary padded to a multiple of ``make_vocab_size_divisible_by x TP`` (so the count depends
  on TP), grouped-query attention, SwiGLU, tied/untied output layer (a tied output layer under
  PP > 1 is a second copy on the last stage), and TempNet's head (tempnet/head.py:
  w1 [M, V/tp], b1 [M], w2 [M, M], b2 [M], pool_scale [], pool_w [M], pool_c []). Virtual
  pipeline stages split a rank's layers into chunks; the rank's parameters stay the same.
* Weights, gradients, optimizer states: exact bytes per parameter for megatron-core's DDP and
  optimizers as ``training/ddp.py`` / ``training/optim.py`` configure them (gradients reduced in
  fp32, so 4 bytes each; Adam moments in fp32; an fp32 master copy when the parameters are 16-bit;
  states divided by the data-parallel size with the distributed optimizer). DDP bucket padding
  (a few hundred elements) is ignored.
* Activations: a model, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"), sbh(34 + 5as/h) bytes per layer for GPT with dropout, generalised term by
  term to grouped-query attention, SwiGLU, no dropout and flash attention (see
  :func:`layer_activation_bytes`); with its TP and sequence-parallel (SP) divisions, selective
  or full (uniform / block) recomputation (:func:`chunk_activation_bytes`), and the micro-batches
  the 1F1B pipeline, plain or interleaved, keeps in flight (:func:`in_flight_chunks`). Plus the
  last stage's logits/loss/TempNet tensors. Allocator fragmentation, NCCL buffers, the CUDA
  context and workspaces are one ``reserve``.
* FLOPs: matmul FLOPs as Megatron-LM counts them (attention over the full s x s square), forward
  + 2x backward, + 1 forward of every recomputed layer (full) or attention core (selective);
  TempNet's W1 has no input gradient (its input is detached), so it costs 2 x forward. The
  pipeline bubble, (PP - 1) / (VP x m) of a step (Narayanan et al. 2021), is reported apart.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_tempnet.config import RECOMPUTE_METHODS, ConfigError, ModelConfig
from megatron_tempnet.training.flops import flops_per_token, layer_forward_flops

GiB = 1024**3
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
H100_MEMORY_GIB = 81559 / 1024  # H100 SXM "80 GB": 81,559 MiB as nvidia-smi reports it
H100_BF16_DENSE_TFLOPS = 989.0
RECOMPUTE = ("none", "selective", "full")
# What megatron-core's layers keep beyond the ideal per-layer count, measured on the CPU for the
# local spec + SDPA (tests/unit/test_estimate.py: 1.37x for tiny LLaMA): RoPE'd copies of Q and
# K keep the fused QKV output alive, unfused SwiGLU keeps a third [s, b, f] tensor, reshapes keep
# [s, b, h] copies. Transformer Engine's layers are not measured (no GPU here): the margin is
# applied to every layer whose activations are kept (and to the layers being recomputed), not
# to the single [s, b, h] input a fully recomputed layer keeps (that tensor is exact).
ACTIVATION_MARGIN = 1.4
ATTENTION = ("flash", "unfused")


@dataclass
class Layout:
    """How one run is laid out over GPUs (the knobs of docs/parallel_layouts.md).

    recompute: "none"; "selective" (the core attention of every layer: megatron-core's
    ``--recompute-granularity selective``); "full" (whole layers, by ``recompute_method``:
    "uniform" checkpoints every model chunk's layers in groups of ``recompute_num_layers``,
    "block" checkpoints the first ``recompute_num_layers`` layers of every chunk and keeps the
    others' activations; None: uniform with 1 layer per group). vp: model chunks per pipeline
    rank (``--virtual-pipeline-model-parallel-size``, the interleaved 1F1B schedule; 1: off).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 4096
    precision: str = "bf16"
    distributed_optimizer: bool = True
    sequence_parallel: bool = False
    recompute: str = "none"  # "none" | "selective" (core attention) | "full" (whole layers)
    recompute_method: str | None = None  # "full" only: "uniform" | "block" (None: uniform)
    recompute_num_layers: int | None = None  # "full" only: per group / per chunk (None: 1)
    vp: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    attention: str = "flash"  # "flash" (TE / flash-attn on GPU) | "unfused" (local spec, CPU)

    def validate(self, model: ModelConfig) -> "Layout":
        """The estimator's own checks, in the trainer's words (arguments.resolve and
        ParallelConfig / TrainConfig.validate refuse the same layouts)."""
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"--recompute-granularity {self.recompute!r}: choose one of "
                              f"{RECOMPUTE}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"--attention {self.attention!r}: choose one of {ATTENTION}")
        if self.precision not in PARAM_BYTES:
            raise ConfigError(f"--precision {self.precision!r}: choose one of "
                              f"{list(PARAM_BYTES)}")
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {self.dp}")
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size >= 2")
        if self.recompute != "full" and (self.recompute_method is not None
                                         or self.recompute_num_layers is not None):
            raise ConfigError("--recompute-method / --recompute-num-layers apply to "
                              "--recompute-granularity full only")
        if self.recompute_method is not None and self.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(f"--recompute-method {self.recompute_method!r}: choose one of "
                              f"{list(RECOMPUTE_METHODS)}")
        if self.vp < 1 or (self.vp > 1 and self.pp < 2):
            raise ConfigError(f"--virtual-pipeline-model-parallel-size {self.vp} needs "
                              "--pipeline-model-parallel-size >= 2")
        model.validate(self.tp, self.pp)
        per_stage = model.num_layers // self.pp
        if per_stage % self.vp:
            raise ConfigError(f"--virtual-pipeline-model-parallel-size {self.vp} does not divide "
                              f"the {per_stage} layers of each pipeline stage")
        if self.recompute == "full" and not 1 <= self.full_layers <= per_stage // self.vp:
            raise ConfigError(f"--recompute-num-layers {self.full_layers}: choose 1 to the "
                              f"{per_stage // self.vp} layers of each model chunk")
        if self.vp > 1 and self.num_microbatches % self.pp:
            raise ConfigError(f"the interleaved pipeline needs the micro-batches per step "
                              f"({self.num_microbatches}) to be a multiple of "
                              f"--pipeline-model-parallel-size {self.pp}")
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def full_method(self) -> str:
        """"uniform" or "block" (full recomputation; uniform when not given)."""
        return self.recompute_method or "uniform"

    @property
    def full_layers(self) -> int:
        """Layers per recompute group (uniform) or per chunk (block); 1 when not given."""
        return self.recompute_num_layers or 1


# ----------------------------------------------------------------------------------- parameters
@dataclass
class ParamCount:
    """Parameter counts of the whole model (unique tensors) and of each (PP stage, TP rank)."""

    embedding: int
    position_embedding: int
    per_layer: int
    layers: int
    final_norm: int
    output_layer: int  # 0 when tied (PP = 1)
    tempnet: int
    total: int  # unique parameters of the full model (TP = PP = 1 view, padded vocabulary)
    padded_vocab_size: int
    per_stage_rank: list = field(default_factory=list)  # [stage] -> params on one TP rank
    trainable_per_stage_rank: list = field(default_factory=list)


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (1 if cfg.family == "llama" else 2)  # RMSNorm w | LayerNorm w, b


def layer_params(cfg: ModelConfig, tp: int = 1) -> tuple[int, int]:
    """(parameters of one transformer layer on one TP rank, of which replicated over TP)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, 2 * cfg.num_query_groups * d
    gated, bias = cfg.family == "llama", cfg.family == "gpt"
    fc1_out = cfg.ffn_hidden_size * (2 if gated else 1)
    split = (h * (q + kv) + (q + kv) * bias  # linear_qkv (column-parallel, bias split)
             + q * h  # linear_proj (row-parallel)
             + h * fc1_out + fc1_out * bias  # linear_fc1 (column-parallel)
             + cfg.ffn_hidden_size * h)  # linear_fc2 (row-parallel)
    replicated = 2 * _norm_params(cfg) + (h + h) * bias  # 2 norms; row-parallel biases
    return split // tp + replicated, replicated


def tempnet_params(m: int, vocab: int, tp: int = 1, arch: str = "paper") -> int:
    """TempNet head (tempnet/head.py). "paper" (PARAM_NAMES): w1 [M, V/tp], b1 [M], w2 [M, M],
    b2 [M], pool_scale [], pool_w [M], pool_c [] = M*V/tp + M + M*M + M + M + 2.
    "scale_aware" (SCALE_AWARE_PARAM_NAMES, K features): w_dir [M, V/tp], w_feat [M, K],
    b_hidden [M], w_out [M], w_out_feat [K], b_out [] = M*V/tp + M*K + 2M + K + 1."""
    if arch == "scale_aware":
        from megatron_tempnet.tempnet.head import SCALE_AWARE_FEATURES
        k = len(SCALE_AWARE_FEATURES)
        return m * vocab // tp + m * k + 2 * m + k + 1
    return m * vocab // tp + m + m * m + m + m + 2


def count_parameters(cfg: ModelConfig, tempnet=None, tp: int = 1, pp: int = 1) -> ParamCount:
    """Exact parameter counts; ``tempnet`` is a TempNetConfig (None or loss_mode without
    TempNet: no head). The vocabulary is padded for ``tp`` as the trainer pads it."""
    cfg.validate(tp, pp)
    v = cfg.padded_vocab_size(tp)
    h, L = cfg.hidden_size, cfg.num_layers
    uses_tempnet = tempnet is not None and tempnet.uses_tempnet
    frozen = uses_tempnet and tempnet.training_mode == "frozen_lm"
    emb = v * h
    pos = cfg.max_position_embeddings * h if cfg.family == "gpt" else 0
    per_layer_full, _ = layer_params(cfg, 1)
    final_norm = _norm_params(cfg)
    output = 0 if cfg.tie_embeddings else v * h
    tn = tempnet_params(tempnet.hidden_size, v, 1, tempnet.arch) if uses_tempnet else 0
    total = emb + pos + L * per_layer_full + final_norm + output + tn

    per_layer_rank, _ = layer_params(cfg, tp)
    stages, trainable = [], []
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        n = per_layer_rank * (L // pp)
        if first:
            n += emb // tp + pos
        if last:
            n += final_norm
            if not cfg.tie_embeddings or pp > 1:  # tied + PP>1: the last stage holds a copy
                n += emb // tp
        tn_rank = (tempnet_params(tempnet.hidden_size, v, tp, tempnet.arch)
                   if (uses_tempnet and last) else 0)
        stages.append(n + tn_rank)
        trainable.append(tn_rank if frozen else n + tn_rank)
    return ParamCount(embedding=emb, position_embedding=pos, per_layer=per_layer_full,
                      layers=L * per_layer_full, final_norm=final_norm, output_layer=output,
                      tempnet=tn, total=total, padded_vocab_size=v, per_stage_rank=stages,
                      trainable_per_stage_rank=trainable)


# ------------------------------------------------------------------------------- state memory
def state_bytes_per_param(precision: str, dp: int, distributed_optimizer: bool) -> dict:
    """Bytes per trainable parameter (weights for every parameter) as megatron-core keeps them.

    weights: the parameter dtype. gradients: ``main_grad`` buffers in fp32 (training/ddp.py,
    grad_reduce_in_fp32). optimizer: Adam exp_avg + exp_avg_sq in fp32 (8), plus an fp32 master
    copy (4) when the parameters are 16-bit; divided by DP with the distributed optimizer.
    """
    opt = 8 + (4 if PARAM_BYTES[precision] < 4 else 0)
    return {"weights": PARAM_BYTES[precision], "gradients": 4,
            "optimizer": opt / dp if distributed_optimizer else opt}


# -------------------------------------------------------------------------------- activations
def layer_activation_bytes(cfg: ModelConfig, layout: Layout) -> dict:
    """Stored activations of one transformer layer for one micro-batch on one GPU (bytes), the
    layer not recomputed (``layout.recompute`` "none" or "selective"; full recomputation is
    :func:`chunk_activation_bytes`'s business).

    Korthikanti et al. 2022, Sec. 4, counts 16-bit tensors saved for the backward (per layer,
    s tokens x b sequences, hidden h, a heads, TP t):
        attention: 11sbh + 5as^2b   (LN/QKV input 2, Q and K 4, V 2, softmax 2as^2b, its dropout
                                     mask as^2b and output 2as^2b, projection input 2, mask 1)
        MLP:       19sbh            (input 2, GeLU input 8, GeLU output 8, dropout mask 1)
        norms:      4sbh
    and divides them over TP and SP as follows:
        no TP, no SP:       sbh (34 + 5as/h)
        TP t:               sbh (10 + 24/t + 5as/(ht))   (norm/QKV/fc1 inputs and the dropout
                                                          masks, 10sbh, on every TP rank)
        TP t + SP:          sbh (34/t + 5as/(ht))        (everything / t)
        selective recompute: the same without 5as/(ht)  (the s x s attention core is recomputed)
    Generalised here, term by term: K and V scale with query groups / heads (GQA; flash only,
    megatron-core's unfused attention expands them to every head); the MLP keeps
    4 x [s, b, f] tensors for SwiGLU (fc1 output holding gate and up, silu(gate), their product)
    and 2 x [s, b, f] for GeLU; dropout masks exist only with dropout > 0; "flash" attention keeps
    no s x s tensor, only the fp32 log-sum-exp [a, s, b] (4as b bytes, / t), which is then the
    attention-core term selective recomputation drops; the tensors scale with the activation
    dtype (fp32 doubles them). For LLaMA (SwiGLU, no dropout) with flash attention that is
        sbh (8 + 2(1 + 2g/a) + 2 + 8f/h) / t + 4asb / t      (TP t + SP; 8 not / t without SP)
    Returns {"replicated", "split", "scores", "total"} in bytes (replicated: the part SP
    divides by t; split: divided by t under TP alone; scores: the attention core).
    """
    s, b, h = layout.seq_length, layout.micro_batch_size, cfg.hidden_size
    a, d, g, f = cfg.num_attention_heads, cfg.head_dim, cfg.num_query_groups, cfg.ffn_hidden_size
    e = PARAM_BYTES[layout.precision] / 2  # activation bytes per element / 2
    sb = s * b
    hid_masks = 2 * sb * h if cfg.hidden_dropout > 0 else 0  # 1-byte masks after proj and fc2
    replicated = e * 2 * sb * h * 4 + hid_masks  # attn norm in, qkv in, mlp norm in, fc1 in
    q = a * d
    # K and V: [s, b, g, d] each with flash attention (GQA native); megatron-core's unfused
    # DotProductAttention repeat_interleaves them to all a heads before its matmuls.
    kv = 2 * (g if layout.attention == "flash" else a) * d
    mlp = e * 2 * sb * f * (4 if cfg.family == "llama" else 2)
    split = e * 2 * sb * (q + kv) + e * 2 * sb * q + mlp  # Q, K, V; proj input; MLP
    if layout.attention == "flash":
        scores = 4 * a * s * b  # fp32 log-sum-exp per head and token
    else:
        per = 2 * e + (1 + 2 * e if cfg.attention_dropout > 0 else 0)  # softmax (+mask, +out)
        scores = per * a * s * s * b
    if layout.recompute == "selective":
        scores = 0
    t = layout.tp
    rep = replicated / t if layout.sequence_parallel else replicated
    total = rep + split / t + scores / t
    return {"replicated": rep, "split": split / t, "scores": scores / t, "total": total}


def chunk_activation_bytes(cfg: ModelConfig, layout: Layout,
                           margin: float = ACTIVATION_MARGIN) -> dict:
    """What one model chunk (Lc = L / (PP x VP) layers: a pipeline stage, or one of its VP
    virtual stages) keeps for one micro-batch, in bytes; A = ``margin`` x
    :func:`layer_activation_bytes` (one layer's activations), X = 2sbh (/ t with SP: one
    [s, b, h] input, checkpointed exactly, no margin).

        none, selective:  stored Lc A                   working 0 (selective: one layer's
                                                        attention core, rematerialised)
        full uniform N:   stored ceil(Lc / N) X         working N A   (every layer recomputed,
                                                                       one group of N at a time)
        full block N:     stored N X + (Lc - N) A       working A     (the first N layers of the
                                                                       chunk recomputed)
    "working" is held once per GPU (the layer(s) being recomputed in the backward), "stored"
    once per micro-batch in flight. Returns {"per_layer" (A), "checkpoint" (X), "layers" (Lc),
    "checkpointed", "kept" (layers with full activations), "stored", "working",
    "recomputed_layers" (layers whose forward runs twice)}.
    """
    s, b, h, t = layout.seq_length, layout.micro_batch_size, cfg.hidden_size, layout.tp
    e = PARAM_BYTES[layout.precision] / 2
    layers = cfg.num_layers // (layout.pp * layout.vp)
    per_layer = margin * layer_activation_bytes(cfg, layout)["total"]
    checkpoint = e * 2 * s * b * h / (t if layout.sequence_parallel else 1)
    if layout.recompute == "full":
        n = min(layout.full_layers, layers)
        if layout.full_method == "uniform":
            checkpointed, kept, recomputed = math.ceil(layers / n), 0, layers
            working = n * per_layer
        else:  # block
            checkpointed, kept, recomputed = n, layers - n, n
            working = per_layer
    else:
        checkpointed, kept, recomputed = 0, layers, 0
        working = 0.0
        if layout.recompute == "selective":
            none = dataclasses.replace(layout, recompute="none")
            working = margin * layer_activation_bytes(cfg, none)["scores"]
    stored = checkpointed * checkpoint + kept * per_layer
    return {"per_layer": per_layer, "checkpoint": checkpoint, "layers": layers,
            "checkpointed": checkpointed, "kept": kept, "stored": stored, "working": working,
            "recomputed_layers": recomputed}


def in_flight_chunks(layout: Layout, stage: int) -> int:
    """Chunk forward passes (one model chunk, one micro-batch) whose activations pipeline rank
    ``stage`` holds at its peak under megatron-core's schedules, m = micro-batches per step:

        1F1B (VP = 1):      min(PP - stage, m)          (the first stage: PP micro-batches, its
                                                         L/PP layers each: L layers in all)
        interleaved (VP):   min(2(PP - stage - 1) + (VP - 1) PP + 1, m VP)
                            (get_pp_rank_microbatches: the warm-up forwards + 1)
    so the first stage holds (2(PP - 1) + (VP - 1) PP + 1) x L/(PP VP) = L (1 + (PP-1)/(PP VP))
    layers' activations: (1 + (PP - 1)/(PP VP)) x what 1F1B holds there (Korthikanti et al.
    2022). The last stage holds one micro-batch under 1F1B and (VP - 1) PP + 1
    chunks interleaved (its last chunk, with the loss, one micro-batch).
    """
    p, v, m = layout.pp, layout.vp, layout.num_microbatches
    if v == 1:
        return min(p - stage, m)
    warmup = 2 * (p - stage - 1) + (v - 1) * p
    return m * v if warmup >= m * v else warmup + 1


def pipeline_bubble(layout: Layout) -> float:
    """Idle fraction of a step on every pipeline rank, relative to the ideal compute time:
    (PP - 1) / (VP x m) (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
    on GPU Clusters": 1F1B (PP - 1)/m, interleaved / VP); 0 without a pipeline."""
    return (layout.pp - 1) / (layout.vp * layout.num_microbatches) if layout.pp > 1 else 0.0


def activation_bytes(cfg: ModelConfig, layout: Layout, tempnet=None,
                     margin: float = ACTIVATION_MARGIN) -> dict:
    """Activations on the first and the last pipeline stage (the two extremes), in bytes.

    A stage holds :func:`in_flight_chunks` x the chunk's stored activations
    (:func:`chunk_activation_bytes`) + one working set. With a frozen LM nothing upstream of
    TempNet needs a gradient, so the LM keeps no activations (one layer's forward working set
    at a time). The last stage adds the output layer's and final norm's inputs and the loss
    (``loss_and_tempnet``, for one micro-batch: the chunk holding the loss runs forward and
    backward back to back): CE keeps the fp32 softmax [s, b, V/t] (megatron-core's
    vocab-parallel CE). The DRO loss depends on
    ``--dro-loss-impl`` ("auto" counts as "fused", what a GPU runs): "reference" keeps p_tau
    [s, b, V/t] fp32 (not when the LM is frozen) and holds the logits, z in fp32 and z/tau at its
    forward peak; "fused" keeps only the logits (no copy) and adds their gradient in the
    backward; "fused_linear" never holds more than one [chunk, V/t] logits chunk (Liger's chunk
    rule) plus the output weight's gradient. TempNet keeps the logits themselves for W1's
    gradient (not a copy; its fp32 work is chunked) and ~8 [s, b, M] fp32 tensors.
    Returns per_layer, first_stage, last_stage, in_flight_first / in_flight_last (micro-batch
    equivalents: chunks / VP), loss_and_tempnet and the chunk breakdown.
    """
    s, b, h, t = layout.seq_length, layout.micro_batch_size, cfg.hidden_size, layout.tp
    e = PARAM_BYTES[layout.precision] / 2
    chunk = chunk_activation_bytes(cfg, layout, margin)
    per_layer = chunk["per_layer"]
    uses_tempnet = tempnet is not None and tempnet.uses_tempnet
    frozen = uses_tempnet and tempnet.training_mode == "frozen_lm"
    hidden = chunk["checkpoint"]  # one [s, b, h] tensor (/ t with SP)
    if frozen:
        stored, working = 0.0, per_layer
    else:
        stored, working = chunk["stored"], chunk["working"]
    first_chunks = in_flight_chunks(layout, 0)
    last_chunks = in_flight_chunks(layout, layout.pp - 1)

    vocab_local = cfg.padded_vocab_size(t) // t
    logits = s * b * vocab_local  # elements of one [s, b, V/t] tensor
    loss_mode = "ce" if tempnet is None else tempnet.loss_mode
    impl = "ce" if loss_mode == "ce" else tempnet.dro_loss_impl
    impl = "fused" if impl == "auto" else impl  # what a GPU runs
    if impl == "fused_linear":
        from megatron_tempnet.tempnet.fused_linear import default_chunk_tokens

        chunk_tokens = min(s * b, default_chunk_tokens(s * b, vocab_local, h))
        logits_kept = 0  # the logits exist one chunk at a time
        loss_saved = 0 if frozen else e * 2 * vocab_local * h  # d W, formed in the forward
        transient = (2 * e + (4 if uses_tempnet else 0)) * chunk_tokens * vocab_local
    elif impl == "fused":
        logits_kept = 2 * e * logits  # saved by the loss (and TempNet): the tensor, no copy
        loss_saved = 0
        transient = (0 if frozen else 2 * e) * logits  # their gradient, in the backward
    else:  # "ce" (megatron-core's fp32 softmax) or "reference" (fp32 p_tau)
        logits_kept = 2 * e * logits if uses_tempnet else 0  # TempNet's W1 gradient needs them
        loss_saved = 0 if frozen else 4 * logits
        transient = (2 * e + 4 + (4 if loss_mode != "ce" else 0)) * logits
    tempnet_saved = 4 * 8 * s * b * tempnet.hidden_size if uses_tempnet else 0
    loss_and_tempnet = ((0 if frozen else 2 * hidden) + logits_kept + loss_saved + tempnet_saved
                        + transient)
    return {"per_layer": per_layer, "first_stage": first_chunks * stored + working,
            "last_stage": last_chunks * stored + working,
            "in_flight_first": first_chunks / layout.vp,
            "in_flight_last": last_chunks / layout.vp,
            "in_flight_first_chunks": first_chunks, "in_flight_last_chunks": last_chunks,
            "chunk": chunk, "loss_and_tempnet": loss_and_tempnet}


# ------------------------------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    stage: str  # which stage is the worst ("first", "last", or "only")
    params: int  # parameters on that GPU
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss_and_tempnet: float
    reserve: float
    capacity: float
    in_flight: float = 1.0  # micro-batches whose activations that stage holds (chunks / VP)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.loss_and_tempnet + self.reserve)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def estimate_memory(cfg: ModelConfig, layout: Layout, tempnet=None, reserve_gib: float = 4.0,
                    capacity_gib: float = H100_MEMORY_GIB,
                    activation_margin: float = ACTIVATION_MARGIN) -> MemoryEstimate:
    """Memory of the most loaded GPU (first or last pipeline stage, TP rank 0)."""
    layout.validate(cfg)
    counts = count_parameters(cfg, tempnet, layout.tp, layout.pp)
    per = state_bytes_per_param(layout.precision, layout.dp, layout.distributed_optimizer)
    acts = activation_bytes(cfg, layout, tempnet, activation_margin)
    candidates = []
    for stage in sorted({0, layout.pp - 1}):
        last = stage == layout.pp - 1
        n, n_train = counts.per_stage_rank[stage], counts.trainable_per_stage_rank[stage]
        candidates.append(MemoryEstimate(
            stage="only" if layout.pp == 1 else ("last" if last else "first"),
            params=n, trainable=n_train, weights=n * per["weights"],
            gradients=n_train * per["gradients"], optimizer=n_train * per["optimizer"],
            activations=acts["last_stage"] if last else acts["first_stage"],
            loss_and_tempnet=acts["loss_and_tempnet"] if last else 0.0,
            reserve=reserve_gib * GiB, capacity=capacity_gib * GiB,
            in_flight=acts["in_flight_last"] if last else acts["in_flight_first"]))
    return max(candidates, key=lambda m: m.total)


# -------------------------------------------------------------------------------------- FLOPs
def flops_per_step(cfg: ModelConfig, layout: Layout, tempnet=None) -> dict:
    """Matmul FLOPs of one optimizer step (global batch), Megatron-LM's way.

    Model FLOPs come from ``training.flops.flops_per_token`` (the numbers the training log's
    MFU uses; frozen LM: forward only). Hardware FLOPs add the recomputed forward: selective,
    every layer's attention scores; full uniform, every layer; full block N, N layers of each
    of the PP x VP model chunks. ``bubble``: :func:`pipeline_bubble`.
    """
    s, v = layout.seq_length, cfg.padded_vocab_size(layout.tp)
    uses = tempnet is not None and tempnet.uses_tempnet
    frozen = uses and tempnet.training_mode == "frozen_lm"
    tokens = layout.global_batch_size * s
    model = tokens * flops_per_token(cfg, s, vocab_size=v, lm_trains=not frozen,
                                     tempnet_hidden=tempnet.hidden_size if uses else None)
    layer, scores = layer_forward_flops(cfg, s)
    if layout.recompute == "full":
        chunks, chunk_layers = layout.pp * layout.vp, cfg.num_layers // (layout.pp * layout.vp)
        per_chunk = (chunk_layers if layout.full_method == "uniform"
                     else min(layout.full_layers, chunk_layers))
        recompute = chunks * per_chunk * layer
    elif layout.recompute == "selective":
        recompute = cfg.num_layers * scores
    else:
        recompute = 0
    hardware = model + (0 if frozen else tokens * recompute)
    lm_fwd = flops_per_token(cfg, s, vocab_size=v, forward_only=True)
    return {"model": model, "hardware": hardware, "tokens": tokens,
            "per_token_forward": lm_fwd, "bubble": pipeline_bubble(layout)}


# ----------------------------------------------------------------------------------- reporting
def gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def describe_recompute(layout: Layout) -> str:
    """The recomputation in the trainer's flags' words."""
    if layout.recompute == "full":
        n = layout.full_layers
        return (f"full {layout.full_method} {n} ("
                + (f"every layer, checkpointed in groups of {n}" if layout.full_method == "uniform"
                   else f"the first {n} layer(s) of each model chunk") + ")")
    return {"none": "none", "selective": "selective (core attention)"}[layout.recompute]


def _activation_note(cfg: ModelConfig, layout: Layout, acts: dict, mem: MemoryEstimate,
                     tempnet, margin: float) -> str:
    if tempnet is not None and tempnet.uses_tempnet and tempnet.training_mode == "frozen_lm":
        return f"frozen LM: one layer's forward, {gib(acts['per_layer'])}"
    c = acts["chunk"]
    stage_layers = cfg.num_layers // layout.pp
    note = f"{mib(acts['per_layer'])} per layer per micro-batch incl. x{margin} margin, "
    if layout.recompute == "full" and layout.full_method == "uniform":
        note += (f"{stage_layers} layers recomputed, {c['checkpointed'] * layout.vp} "
                 f"checkpointed inputs of {mib(c['checkpoint'])}")
    elif layout.recompute == "full":
        note += (f"{stage_layers} layers: {c['checkpointed'] * layout.vp} recomputed "
                 f"(inputs of {mib(c['checkpoint'])}), {c['kept'] * layout.vp} kept")
    else:
        note += f"{stage_layers} layers"
    chunks = (acts["in_flight_last_chunks"] if mem.stage in ("last", "only")
              else acts["in_flight_first_chunks"])
    if mem.in_flight != 1:
        note += f" x {mem.in_flight:g} micro-batches in flight"
        if layout.vp > 1:
            note += f" ({chunks} chunks of {c['layers']} layers)"
    if c["working"]:
        note += f" + {mib(c['working'])} being recomputed"
    return note


def explain(cfg: ModelConfig, layout: Layout, tempnet=None, name: str = "run",
            reserve_gib: float = 4.0, capacity_gib: float = H100_MEMORY_GIB,
            mfu: float = 0.4, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
            activation_margin: float = ACTIVATION_MARGIN) -> str:
    """A plain-words report: parameters, memory per GPU term by term, the verdict, FLOPs and
    the pipeline bubble."""
    counts = count_parameters(cfg, tempnet, layout.tp, layout.pp)
    counts1 = count_parameters(cfg, tempnet, 1, 1)
    mem = estimate_memory(cfg, layout, tempnet, reserve_gib, capacity_gib, activation_margin)
    acts = activation_bytes(cfg, layout, tempnet, activation_margin)
    fl = flops_per_step(cfg, layout, tempnet)
    per = state_bytes_per_param(layout.precision, layout.dp, layout.distributed_optimizer)
    lay = layout
    loss_impl = ("megatron-core's CE" if tempnet is None or tempnet.loss_mode == "ce"
                 else f"--dro-loss-impl {tempnet.dro_loss_impl}")
    step_s = fl["model"] / (mfu * peak_tflops * 1e12 * lay.world_size)
    lines = [
        f"## {name}",
        f"layout: TP={lay.tp} PP={lay.pp} DP={lay.dp} ({lay.world_size} GPUs), micro-batch "
        f"{lay.micro_batch_size}, global batch {lay.global_batch_size} "
        f"({lay.num_microbatches} micro-batches per DP rank per step), seq {lay.seq_length}, "
        f"{lay.precision}, distributed optimizer {'on' if lay.distributed_optimizer else 'off'}, "
        f"sequence parallel {'on' if lay.sequence_parallel else 'off'}, recompute "
        f"{describe_recompute(lay)}, virtual pipeline "
        f"{lay.vp if lay.vp > 1 else 'off'}, attention {lay.attention}",
        f"parameters: {counts.total:,} at TP={lay.tp} (padded vocabulary "
        f"{counts.padded_vocab_size}); {counts1.total:,} at TP=1; TempNet head "
        f"{counts.tempnet:,}",
        f"most loaded GPU: {'the ' + mem.stage + ' pipeline stage' if lay.pp > 1 else 'every GPU'}"
        f", {mem.params:,} parameters ({mem.trainable:,} trainable)",
        f"  weights     {gib(mem.weights):>10}  ({per['weights']} B/param)",
        f"  gradients   {gib(mem.gradients):>10}  (fp32 main_grad, 4 B/trainable param)",
        f"  optimizer   {gib(mem.optimizer):>10}  ({per['optimizer']:.2f} B/trainable param: "
        f"Adam m, v{' + fp32 master' if per['weights'] < 4 else ''}"
        f"{f' / DP {lay.dp}' if lay.distributed_optimizer else ', not sharded'})",
        f"  activations {gib(mem.activations):>10}  ("
        + _activation_note(cfg, lay, acts, mem, tempnet, activation_margin) + ")",
        f"  loss+TempNet{gib(mem.loss_and_tempnet):>10}  (logits and loss tensors [s, b, V/t] "
        f"for {loss_impl}, TempNet)",
        f"  reserve     {gib(mem.reserve):>10}  (CUDA context, NCCL buffers, fragmentation)",
        f"  total       {gib(mem.total):>10}  of {gib(mem.capacity)}: "
        + ("FITS" if mem.fits else "DOES NOT FIT")
        + f" ({gib(abs(mem.capacity - mem.total))} "
        + ("headroom)" if mem.fits else "over)"),
        "why: " + verdict(mem, lay),
        f"FLOPs per step: {fl['model'] / 1e15:,.1f} PFLOP model, {fl['hardware'] / 1e15:,.1f} "
        f"PFLOP hardware ({fl['tokens']:,} tokens); at {mfu:.0%} MFU of "
        f"{peak_tflops:.0f} TFLOP/s per GPU: {step_s:.2f} s/step, "
        f"{fl['tokens'] / step_s:,.0f} tokens/s",
    ]
    if lay.pp > 1:
        lines.append(
            f"pipeline bubble: (PP-1)/(VP x m) = {lay.pp - 1}/({lay.vp} x "
            f"{lay.num_microbatches}) = {fl['bubble']:.2%} of the compute time idle on every "
            f"stage ({'interleaved' if lay.vp > 1 else 'plain'} 1F1B; an MFU figure includes "
            "it)")
    return "\n".join(lines)


def verdict(mem: MemoryEstimate, layout: Layout) -> str:
    """One sentence naming the dominant term and what would change the answer."""
    terms = {"model states (weights + gradients + optimizer)":
             mem.weights + mem.gradients + mem.optimizer,
             "activations": mem.activations + mem.loss_and_tempnet}
    big = max(terms, key=terms.get)
    share = terms[big] / mem.total
    if mem.fits:
        return (f"{big} dominate ({share:.0%} of the total); the sum stays below the "
                f"{gib(mem.capacity)} of one GPU.")
    if big.startswith("model"):
        hint = "raise TP or PP (fewer parameters per GPU) or DP with the distributed optimizer"
    else:
        options = []
        if layout.tp > 1 and not layout.sequence_parallel:
            options.append("--sequence-parallel")
        if layout.recompute == "none" and layout.attention == "unfused":
            options.append("--recompute-granularity selective")
        if layout.recompute != "full":
            options.append("--recompute-granularity full --recompute-method block|uniform "
                           "--recompute-num-layers N")
        options.append("a smaller micro-batch")
        hint = "use " + ", ".join(options[:-1]) + (" or " if options[:-1] else "") + options[-1]
    return f"{big} alone take {gib(terms[big])} ({share:.0%}); {hint}."


def layout_from_run(run, world_size: int, *, attention: str | None = None) -> Layout:
    """A Layout from a parsed RunConfig (arguments.parse_args) on ``world_size`` GPUs: TP, PP,
    VP, sequence parallelism and recomputation as the run sets them (its ``parallel:`` and
    ``train:`` sections or their flags). ``attention`` None: "unfused" for
    ``--attention-backend local`` (megatron-core's DotProductAttention), else "flash"
    (Transformer Engine, or PyTorch SDPA's flash kernel on a GPU). ``arguments.resolve(run,
    world_size)`` checks the rest of the run."""
    par, tr = run.parallel, run.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by TP {tp} x PP {pp}")
    return Layout(tp=tp, pp=pp, dp=world_size // (tp * pp),
                  micro_batch_size=tr.micro_batch_size, global_batch_size=tr.global_batch_size,
                  seq_length=tr.seq_length, precision=tr.precision,
                  distributed_optimizer=par.use_distributed_optimizer,
                  sequence_parallel=par.sequence_parallel,
                  recompute=tr.recompute_granularity or "none",
                  recompute_method=tr.recompute_method,
                  recompute_num_layers=tr.recompute_num_layers, vp=par.virtual_size,
                  attention=attention or ("unfused" if run.model.attention_backend == "local"
                                          else "flash"))


__all__ = ["Layout", "ParamCount", "MemoryEstimate", "count_parameters", "layer_params",
           "tempnet_params", "state_bytes_per_param", "layer_activation_bytes",
           "chunk_activation_bytes", "in_flight_chunks", "pipeline_bubble",
           "activation_bytes", "estimate_memory", "ACTIVATION_MARGIN", "flops_per_step",
           "describe_recompute", "explain", "verdict", "layout_from_run", "GiB",
           "H100_MEMORY_GIB"]

"""tools/estimate.py (megatron_tempnet/experiments/estimate.py) against hand counts and real
built models.

Validated here: parameter counts exactly (tiny LLaMA and GPT, with and without TempNet, tied and
untied, against sum(p.numel()) of the model build_tempnet_model builds); weights, gradient
buffers and optimizer states in bytes against the tensors megatron-core's DDP and optimizers
allocate on the CPU (fp32 and bf16, distributed optimizer on and off, at DP=1); one layer's
stored activations against the tensors autograd saves (unfused attention, fp32, CPU).
Checked against the formulas by hand (not measured): the TP / sequence-parallel divisions,
selective and full (uniform, block) recomputation, the in-flight micro-batches of the plain and
interleaved 1F1B pipeline and its bubble, LLaMA-2 7B and 70B layouts number by number; the run
YAMLs' layouts (sequence parallelism wherever TP > 1) and docs/parallel_layouts.md's table
against the estimator.
Not validated here: activations with flash attention / Transformer Engine, fp16/bf16 activation
memory, allocator overheads (GPU only).
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tempnet.arguments import parse_args, resolve
from megatron_tempnet.config import ConfigError, TrainConfig, load_model_preset
from megatron_tempnet.experiments.estimate import (Layout, activation_bytes,
                                                   chunk_activation_bytes, count_parameters,
                                                   estimate_memory, flops_per_step,
                                                   in_flight_chunks, layer_activation_bytes,
                                                   layout_from_run, pipeline_bubble,
                                                   state_bytes_per_param)
from megatron_tempnet.tempnet.config import TempNetConfig

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "configs" / "runs"
SCRIPTS = REPO / "slurm"


def test_llama2_7b_count_is_exact():
    """6,738,415,616 = 2 x 32000 x 4096 (embedding, untied output) + 32 x (4h^2 + 3 h f + 2h)
    + h. The vocabulary 32000 is a multiple of 128 (make_vocab_size_divisible_by) x TP for
    TP = 1 and 2, so there is no padding there; at TP 4 it pads to 32256, at TP 8 to 32768."""
    cfg = load_model_preset("llama2-7b")
    assert cfg.make_vocab_size_divisible_by == 128 and cfg.vocab_size == 32000
    for tp in (1, 2):
        counts = count_parameters(cfg, None, tp=tp)
        assert counts.padded_vocab_size == 32000
        assert counts.total == 6_738_415_616
    h, f, v = 4096, 11008, 32000
    assert 2 * v * h + 32 * (4 * h * h + 3 * h * f + 2 * h) + h == 6_738_415_616
    assert count_parameters(cfg, None, tp=4).total == 6_738_415_616 + 2 * 256 * h
    assert count_parameters(cfg, None, tp=8).padded_vocab_size == 32768
    # TempNet adds M*V + 3M + M^2 + M + 2 (head.py PARAM_NAMES), here M = 256
    tn = TempNetConfig(loss_mode="tempnet_dro")
    assert count_parameters(cfg, tn).total - 6_738_415_616 == 256 * 32000 + 256 * 256 + 3 * 256 + 2
    # per TP rank: sharded matrices / TP, norms replicated
    assert sum(count_parameters(cfg, None, tp=2).per_stage_rank) * 2 \
        == 6_738_415_616 + (2 * 32 + 1) * h


def test_llama2_70b_count():
    assert count_parameters(load_model_preset("llama2-70b")).total == 68_976_648_192


@pytest.mark.parametrize("preset,overrides,loss_mode", [
    ("tiny-llama", {}, "ce"), ("tiny-llama", {}, "tempnet_dro"),
    ("tiny-llama", {}, "dro_fixed_tau"), ("tiny-llama", {"tie_embeddings": True}, "tempnet_dro"),
    ("tiny-gpt", {}, "ce"), ("tiny-gpt", {}, "tempnet_dro"),
    ("tiny-gpt", {"tie_embeddings": False, "vocab_size": 301}, "tempnet_dro"),
])
def test_count_matches_built_model(single_process, preset, overrides, loss_mode):
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model

    cfg = load_model_preset(preset, **{"vocab_size": 500, **overrides})
    tn = TempNetConfig(loss_mode=loss_mode, hidden_size=24)
    model = build_tempnet_model(cfg, tn, single_process, seed=3)
    built = sum(p.numel() for p in model.parameters())
    counts = count_parameters(cfg, tn)
    assert counts.total == built == counts.per_stage_rank[0]
    head = getattr(model, "tempnet", None)
    assert counts.tempnet == (sum(p.numel() for p in head.parameters()) if head else 0)


def _state_bytes(ddp, optimizer):
    """(gradient buffer bytes, optimizer-state bytes) as allocated by megatron-core."""
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    storages = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        tensors = [v for state in opt.optimizer.state.values() for k, v in state.items()
                   if k != "step"]  # Adam's scalar step counters are not counted
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            tensors += [t for group in (getattr(opt, name, None) or []) for t in group]
        for t in tensors:
            if torch.is_tensor(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return grads, sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("distributed", [False, True])
def test_state_memory_matches_allocated_tensors(single_process, precision, distributed):
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
    from megatron_tempnet.training.ddp import wrap_ddp
    from megatron_tempnet.training.optim import build_optimizer, precision_dtype

    cfg = load_model_preset("tiny-llama", vocab_size=500)
    tn = TempNetConfig(loss_mode="tempnet_dro", hidden_size=16)
    model = build_tempnet_model(cfg, tn, single_process, params_dtype=precision_dtype(precision))
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed)
    optimizer = build_optimizer([ddp], TrainConfig(precision=precision),
                                use_distributed_optimizer=distributed, tempnet_cfg=tn)
    optimizer.step()  # Adam allocates its moments on the first step
    n = count_parameters(cfg, tn).total
    per = state_bytes_per_param(precision, 1, distributed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads, states = _state_bytes(ddp, optimizer)
    # megatron-core's torch norms stay fp32 under bf16 (2 more bytes each, no fp32 master copy);
    # Transformer Engine's are bf16. DDP pads buffers by at most a few hundred elements.
    norms = sum(p.numel() for name, p in model.named_parameters() if "layernorm" in name
                or name.endswith("final_layernorm.weight"))
    extra_norm = 2 * norms if precision == "bf16" else 0
    assert weights == n * per["weights"] + extra_norm
    assert 0 <= grads - n * per["gradients"] <= 4 * 1024
    assert states == n * per["optimizer"] - (4 * norms if precision == "bf16" else 0)


def _saved_bytes_of_layer(model, layer, tokens, labels):
    """Bytes of the distinct non-parameter storages autograd saves inside ``layer``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    layer.register_forward_pre_hook(lambda *_: hooks.__enter__())
    layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    model(tokens, position_ids, None, labels=labels)
    return sum(storages.values())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt"])
def test_layer_activations_match_saved_tensors(single_process, preset):
    """The per-layer activation model against what autograd keeps for one megatron-core layer
    (local spec + SDPA core attention as built on CPU, fp32): the ideal Korthikanti-style count
    (flash-like attention, no s x s tensor) is a lower bound, and the implementation keeps
    at most ACTIVATION_MARGIN times it (RoPE'd Q/K copies keep the fused QKV output alive,
    unfused SwiGLU and the [s, b, h] reshapes keep extra copies, RoPE's cos/sin)."""
    from megatron_tempnet.experiments.estimate import ACTIVATION_MARGIN
    from megatron_tempnet.models.tempnet_gpt import build_tempnet_model

    cfg = load_model_preset(preset, vocab_size=500)
    model = build_tempnet_model(cfg, TempNetConfig(), single_process)
    s, b = 64, 3
    tokens = torch.randint(0, 500, (b, s))
    measured = _saved_bytes_of_layer(model, model.decoder.layers[1], tokens, tokens)
    layout = Layout(micro_batch_size=b, seq_length=s, precision="fp32", attention="flash",
                    global_batch_size=b)
    ideal = layer_activation_bytes(cfg, layout)["total"]
    assert ideal <= measured <= ACTIVATION_MARGIN * ideal, (measured, ideal, measured / ideal)


def test_korthikanti_formula_is_the_special_case():
    """GPT with dropout, unfused attention, 16-bit: sbh(34 + 5as/h) per layer; with TP t and no
    SP sbh(10 + 24/t + 5as/(ht)); with SP everything / t; selective recompute drops 5as/h."""
    cfg = load_model_preset("gpt2-350m", hidden_dropout=0.1, attention_dropout=0.1)
    s, b, h, a = 1024, 4, cfg.hidden_size, cfg.num_attention_heads
    sbh = s * b * h

    def act(**kw):
        lay = Layout(seq_length=s, micro_batch_size=b, global_batch_size=b, precision="bf16",
                     attention="unfused", **kw)
        return layer_activation_bytes(cfg, lay)["total"]

    assert act() == sbh * (34 + 5 * a * s / h)
    assert act(tp=4) == pytest.approx(sbh * (10 + 24 / 4 + 5 * a * s / (h * 4)))
    assert act(tp=4, sequence_parallel=True) == pytest.approx(sbh / 4 * (34 + 5 * a * s / h))
    assert act(tp=4, sequence_parallel=True, recompute="selective") == pytest.approx(sbh / 4 * 34)


def _llama(**kw):
    """A 16-bit LLaMA layout at seq 4096, micro-batch 1, flash attention (the runs' GPU path)."""
    return Layout(**{"seq_length": 4096, "micro_batch_size": 1, "global_batch_size": 1,
                     "precision": "bf16", "attention": "flash", **kw})


@pytest.mark.parametrize("attention", ["flash", "unfused"])
def test_sequence_parallel_divides_the_replicated_part_by_tp(attention):
    """Without SP the norm / QKV / fc1 inputs (8sbh bytes for LLaMA in 16 bits) stay on every
    TP rank and only the rest is divided by t; with SP all of it is: exactly 1/t of TP = 1."""
    cfg = load_model_preset("llama2-7b")
    s, h = 4096, cfg.hidden_size
    one = layer_activation_bytes(cfg, _llama(attention=attention))
    for t in (2, 4, 8):
        tp = layer_activation_bytes(cfg, _llama(tp=t, attention=attention))
        sp = layer_activation_bytes(cfg, _llama(tp=t, sequence_parallel=True,
                                                attention=attention))
        assert sp["total"] == pytest.approx(one["total"] / t)
        assert tp["replicated"] == one["replicated"] == 8 * s * h
        assert tp["total"] - sp["total"] == pytest.approx(8 * s * h * (1 - 1 / t))
        assert tp["split"] == sp["split"] == pytest.approx(one["split"] / t)


@pytest.mark.parametrize("attention", ["flash", "unfused"])
def test_selective_recompute_removes_the_attention_core_only(attention):
    """Selective drops the attention-core term (Korthikanti's 5as/(ht); the fp32 log-sum-exp
    4as b/t with flash attention) and keeps every other tensor; its working set is one layer's
    core, recomputed."""
    cfg = load_model_preset("llama2-7b")
    a, s, t = cfg.num_attention_heads, 4096, 2
    none = layer_activation_bytes(cfg, _llama(tp=t, sequence_parallel=True, attention=attention))
    sel = layer_activation_bytes(cfg, _llama(tp=t, sequence_parallel=True, attention=attention,
                                             recompute="selective"))
    assert sel["scores"] == 0 and none["scores"] > 0
    assert none["total"] - sel["total"] == none["scores"]
    assert sel["replicated"] == none["replicated"] and sel["split"] == none["split"]
    if attention == "flash":
        assert none["scores"] == 4 * a * s / t  # fp32 [a/t, s, b]
    else:  # bf16 softmax output [a/t, b, s, s], no attention dropout
        assert none["scores"] == 2 * a * s * s / t
    chunk = chunk_activation_bytes(cfg, _llama(tp=t, sequence_parallel=True, attention=attention,
                                               recompute="selective"), margin=1.0)
    assert chunk["working"] == none["scores"]
    assert chunk["stored"] == cfg.num_layers * sel["total"]


@pytest.mark.parametrize("sp", [False, True])
def test_full_recompute_keeps_the_layer_inputs(sp):
    """Full uniform 1: every layer keeps only its input, 2sbh bytes (/ t with SP), and one
    layer is rematerialised at a time; uniform N: one input per group of N, N layers
    rematerialised; block N: N inputs + full activations of the other layers, between the two."""
    cfg = load_model_preset("llama2-7b")
    s, h, t, L = 4096, cfg.hidden_size, 2, cfg.num_layers
    x = 2 * s * h / (t if sp else 1)
    A = layer_activation_bytes(cfg, _llama(tp=t, sequence_parallel=sp))["total"]

    def chunk(**kw):
        return chunk_activation_bytes(cfg, _llama(tp=t, sequence_parallel=sp, **kw), margin=1.0)

    none = chunk()
    uniform = chunk(recompute="full", recompute_method="uniform", recompute_num_layers=1)
    assert uniform["stored"] == L * x and uniform["working"] == A
    assert uniform["stored"] / L == x  # 2sbh (/t) per layer
    assert chunk(recompute="full")["stored"] == uniform["stored"]  # method, N default: uniform 1
    grouped = chunk(recompute="full", recompute_method="uniform", recompute_num_layers=4)
    assert grouped["stored"] == L // 4 * x and grouped["working"] == 4 * A
    assert chunk(recompute="full", recompute_method="uniform",
                 recompute_num_layers=5)["stored"] == 7 * x  # ceil(32 / 5) groups
    assert none["stored"] == L * A and none["working"] == 0
    for n in (1, 8, 16, 31):
        block = chunk(recompute="full", recompute_method="block", recompute_num_layers=n)
        assert block["stored"] == n * x + (L - n) * A and block["working"] == A
        assert uniform["stored"] < block["stored"] < none["stored"]
    full_block = chunk(recompute="full", recompute_method="block", recompute_num_layers=L)
    assert full_block["stored"] == uniform["stored"]


def test_in_flight_micro_batches_and_bubble_of_the_pipeline():
    """1F1B: the first stage holds min(PP, m) micro-batches of its L/PP layers, i.e. L layers;
    interleaved: 2(PP-1) + (VP-1)PP + 1 chunks of L/(PP VP) layers = L (1 + (PP-1)/(PP VP));
    the last stage one micro-batch (1F1B) or (VP-1)PP + 1 chunks; bubble (PP-1)/(VP m)."""
    L = 80
    for pp, vp, m in [(4, 1, 256), (4, 5, 256), (4, 2, 8), (8, 5, 64), (2, 10, 4)]:
        lay = Layout(pp=pp, vp=vp, global_batch_size=m)
        first, last = in_flight_chunks(lay, 0), in_flight_chunks(lay, pp - 1)
        if vp == 1:
            assert first == pp and last == 1
        else:
            assert first == 2 * (pp - 1) + (vp - 1) * pp + 1 and last == (vp - 1) * pp + 1
            assert first * L // (pp * vp) == pytest.approx(L * (1 + (pp - 1) / (pp * vp)))
        assert pipeline_bubble(lay) == (pp - 1) / (vp * m)
    # fewer micro-batches than the warm-up: every one is in flight
    assert in_flight_chunks(Layout(pp=4, global_batch_size=2), 0) == 2
    assert in_flight_chunks(Layout(pp=4, vp=5, global_batch_size=4), 0) == 4 * 5
    assert pipeline_bubble(Layout(pp=1, global_batch_size=8)) == 0


def test_llama2_7b_by_hand():
    """LLaMA-2 7B at its run layout: TP=2 + SP, PP=1, DP=16, micro-batch 1, seq 4096, bf16,
    flash attention. s = 4096, b = 1, h = 4096, a = g = 32, f = 11008, t = 2; per layer
    sbh (8 + 2(1 + 2g/a) + 2 + 8f/h) / t + 4asb / t = 16,777,216 x 37.5 / 2 + 262,144
    = 314,834,944 bytes; x 1.4 (margin) x 32 layers in the estimate."""
    cfg = load_model_preset("llama2-7b")
    s, b, h, a, f, t = 4096, 1, 4096, 32, 11008, 2
    sbh = s * b * h
    per_layer = sbh * (8 + 2 * (1 + 2 * 32 / 32) + 2 + 8 * f / h) / t + 4 * a * s * b / t
    assert per_layer == 314_834_944
    lay = Layout(tp=2, dp=16, micro_batch_size=1, global_batch_size=1024, seq_length=4096,
                 precision="bf16", sequence_parallel=True)
    assert layer_activation_bytes(cfg, lay)["total"] == per_layer
    no_sp = Layout(**{**lay.__dict__, "sequence_parallel": False})
    assert layer_activation_bytes(cfg, no_sp)["total"] == per_layer + 8 * sbh / 2  # 381,943,808
    tn = TempNetConfig(loss_mode="tempnet_dro")
    acts = activation_bytes(cfg, lay, tn)
    assert acts["last_stage"] == pytest.approx(32 * 1.4 * 314_834_944)  # 13.14 GiB
    # the whole GPU: 3,373,503,234 parameters x (2 + 4 + 12/16) bytes, activations, the fused
    # DRO loss (final-norm and output inputs 2 x 2sbh/t, bf16 logits and their gradient
    # 2 x 2 s V/t, TempNet 8 fp32 [s, M]) and the 4 GiB reserve
    n = 3_373_503_234
    loss = 2 * 2 * sbh / t + 2 * 2 * s * 32000 / t + 4 * 8 * s * 256
    mem = estimate_memory(cfg, lay, tn)
    assert mem.params == n and mem.loss_and_tempnet == loss == 329_252_864
    assert mem.total == pytest.approx(n * 6.75 + 32 * 1.4 * 314_834_944 + loss + 4 * 2**30)
    assert round(mem.total / 2**30, 1) == 38.6
    # full uniform 1: 32 inputs of 2sbh/t + one layer rematerialised
    full = Layout(**{**lay.__dict__, "recompute": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 1})
    assert activation_bytes(cfg, full, tn)["last_stage"] == pytest.approx(
        32 * 2 * sbh / t + 1.4 * 314_834_944)
    block = Layout(**{**full.__dict__, "recompute_method": "block", "recompute_num_layers": 8})
    assert activation_bytes(cfg, block, tn)["last_stage"] == pytest.approx(
        8 * 2 * sbh / t + 24 * 1.4 * 314_834_944 + 1.4 * 314_834_944)


def test_llama2_70b_interleaved_by_hand():
    """LLaMA-2 70B at TP=8 + SP, PP=4, VP=5, DP=4: h = 8192, a = 64, g = 8, f = 28672;
    per layer sbh (8 + 2(1 + 16/64) + 2 + 8f/h) / 8 + 4as/8 = 33,554,432 x 40.5 / 8 + 131,072
    = 170,000,384 bytes. The first stage holds 23 chunks of 4 layers (92 = 80 x (1 + 3/20)), the
    last 17; the bubble is 3 / (5 x 256)."""
    cfg = load_model_preset("llama2-70b")
    sbh, t = 4096 * 8192, 8
    per_layer = sbh * (8 + 2 * (1 + 2 * 8 / 64) + 2 + 8 * 28672 / 8192) / t + 4 * 64 * 4096 / t
    assert per_layer == 170_000_384
    lay = Layout(tp=8, pp=4, vp=5, dp=4, micro_batch_size=1, global_batch_size=1024,
                 seq_length=4096, precision="bf16", sequence_parallel=True)
    acts = activation_bytes(cfg, lay)
    assert acts["in_flight_first_chunks"] == 23 and acts["in_flight_last_chunks"] == 17
    assert acts["first_stage"] == pytest.approx(92 * 1.4 * per_layer)
    assert acts["last_stage"] == pytest.approx(68 * 1.4 * per_layer)
    plain = Layout(**{**lay.__dict__, "vp": 1})
    assert activation_bytes(cfg, plain)["first_stage"] == pytest.approx(80 * 1.4 * per_layer)
    assert flops_per_step(cfg, lay)["bubble"] == 3 / (5 * 256)
    assert flops_per_step(cfg, plain)["bubble"] == 3 / 256


def test_recompute_flops():
    """Hardware FLOPs: + every layer's forward (full uniform), + N layers of each of the
    PP x VP chunks (full block N), + every layer's attention scores (selective)."""
    from megatron_tempnet.training.flops import layer_forward_flops

    cfg = load_model_preset("llama2-70b")
    layer, scores = layer_forward_flops(cfg, 4096)
    tokens = 1024 * 4096

    def extra(**kw):
        lay = Layout(tp=8, pp=4, vp=5, dp=4, global_batch_size=1024, seq_length=4096, **kw)
        fl = flops_per_step(cfg, lay)
        return (fl["hardware"] - fl["model"]) / tokens

    assert extra() == 0
    assert extra(recompute="selective") == pytest.approx(80 * scores)
    assert extra(recompute="full", recompute_method="uniform",
                 recompute_num_layers=2) == pytest.approx(80 * layer)
    assert extra(recompute="full", recompute_method="block",
                 recompute_num_layers=2) == pytest.approx(2 * 20 * layer)


@pytest.mark.parametrize("kw,message", [
    (dict(sequence_parallel=True), "--sequence-parallel needs --tensor-model-parallel-size"),
    (dict(pp=4, vp=3, global_batch_size=8), "does not divide the 20 layers"),
    (dict(vp=2), "needs --pipeline-model-parallel-size >= 2"),
    (dict(pp=4, vp=5, global_batch_size=6), r"micro-batches per step \(6\)"),
    (dict(pp=4, vp=5, global_batch_size=8, recompute="full", recompute_num_layers=5),
     "choose 1 to the 4 layers of each model chunk"),
    (dict(recompute="selective", recompute_method="block"), "apply to --recompute-granularity "
                                                           "full only"),
    (dict(recompute="full", recompute_method="blocks"), "--recompute-method 'blocks'"),
])
def test_layout_refuses_what_the_trainer_refuses(kw, message):
    with pytest.raises(ConfigError, match=message):
        Layout(**kw).validate(load_model_preset("llama2-70b"))


def test_layout_from_run_reads_the_new_fields():
    run = parse_args(["--model", "llama2-70b", "--tensor-model-parallel-size", "8",
                      "--pipeline-model-parallel-size", "4", "--sequence-parallel",
                      "--virtual-pipeline-model-parallel-size", "5", "--micro-batch-size", "1",
                      "--global-batch-size", "1024", "--recompute-granularity", "full",
                      "--recompute-method", "block", "--recompute-num-layers", "2"])
    lay = layout_from_run(run, 128)
    assert (lay.tp, lay.pp, lay.vp, lay.dp, lay.sequence_parallel) == (8, 4, 5, 4, True)
    assert (lay.recompute, lay.recompute_method, lay.recompute_num_layers) == ("full", "block", 2)
    assert lay.attention == "flash"
    run = parse_args(["--model", "tiny-llama", "--attention-backend", "local"])
    assert layout_from_run(run, 1).recompute == "none"
    assert layout_from_run(run, 1).attention == "unfused"


def _script_nodes(script: Path) -> int:
    return int(re.search(r"^#SBATCH --nodes=(\d+)", script.read_text(), re.M).group(1))


RUN_OF_SCRIPT = {
    "pretrain_llama7b_tempnet.sh": "llama2-7b-tempnet.yaml",
    "pretrain_llama13b_tempnet.sh": "llama2-13b-tempnet.yaml",
    "pretrain_llama70b_tempnet.sh": "llama2-70b-tempnet.yaml",
    "pretrain_gpt2_125m_tempnet.sh": "gpt2-125m-tempnet.yaml",
    "train_tempnet_frozen_llama7b.sh": "llama2-7b-tempnet-frozen.yaml",
    "pretrain_llama7b_tempnet_deepspeed.sh": "llama2-7b-tempnet.yaml",
}


@pytest.mark.parametrize("script", sorted(RUN_OF_SCRIPT))
def test_run_layouts_are_valid_and_fit_on_h100(script):
    """Each script's run YAML parses with the trainer's parser, its layout is valid on the
    script's #SBATCH --nodes x 8 GPUs, and the estimate fits in 80 GB."""
    path = SCRIPTS / script
    assert f"configs/runs/{RUN_OF_SCRIPT[script]}" in path.read_text()
    run = parse_args(["--config", str(RUNS / RUN_OF_SCRIPT[script])])
    run.tempnet.validate()
    layout = layout_from_run(run, _script_nodes(path) * 8)
    run.train.validate(layout.dp)
    resolve(run, layout.world_size)  # the trainer's checks: VP, micro-batches, recomputation
    assert run.train.seq_length == (1024 if "gpt2" in script else 4096)
    mem = estimate_memory(run.model, layout, run.tempnet)
    assert mem.fits, (script, mem.total / 2**30)
    # sequence parallelism wherever TP > 1; the interleaved pipeline's micro-batch rule
    assert layout.sequence_parallel == (layout.tp > 1)
    if layout.vp > 1:
        assert layout.num_microbatches % layout.pp == 0
        assert run.model.num_layers % (layout.pp * layout.vp) == 0


def _layouts_table():
    """docs/parallel_layouts.md's layouts table (the first of its section): {run: {column:
    cell}}."""
    text = (REPO / "docs" / "parallel_layouts.md").read_text()
    section = text.split("## The layouts", 1)[1].split("\n## ", 1)[0]
    table = section.strip().split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return {re.match(r"`([\w.-]+)`", r[0]).group(1): dict(zip(header, r)) for r in body}


def test_docs_layout_table_is_the_estimators_output():
    """Every run's row in docs/parallel_layouts.md: the YAML's layout and the estimator's GiB
    per GPU and bubble for the script's node count (rerun tools/estimate.py when it changes)."""
    table = _layouts_table()
    scripts = {run: script for script, run in RUN_OF_SCRIPT.items() if "deepspeed" not in script}
    assert sorted(table) == sorted(r[:-len(".yaml")] for r in scripts)
    for run_name, row in table.items():
        path = SCRIPTS / scripts[run_name + ".yaml"]
        run = parse_args(["--config", str(RUNS / f"{run_name}.yaml")])
        lay = layout_from_run(run, _script_nodes(path) * 8)
        mem = estimate_memory(run.model, lay, run.tempnet)
        assert row["nodes"] == str(_script_nodes(path)), run_name
        assert (row["TP"], row["PP"], row["VP"], row["DP"]) == tuple(
            str(x) for x in (lay.tp, lay.pp, lay.vp if lay.vp > 1 else "-", lay.dp)), run_name
        assert row["SP"] == ("on" if lay.sequence_parallel else "off"), run_name
        assert row["GiB per GPU, now"].split()[0] == f"{mem.total / 2**30:.1f}", run_name
        bubble = pipeline_bubble(lay)
        assert row["bubble"] == (f"{bubble:.2%}" if lay.pp > 1 else "-"), run_name


def _estimate_main(argv, capsys):
    """tools/estimate.py's main() in this process (its imports cost a subprocess ~10 s)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_cli", REPO / "tools" / "estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_takes_the_layout_from_the_run_and_its_flags(capsys):
    rc, out, _ = _estimate_main(["--config", "configs/runs/llama2-70b-tempnet.yaml",
                                 "--nodes", "16"], capsys)
    assert rc == 0
    for words in ("TP=8 PP=4 DP=4", "sequence parallel on", "recompute none",
                  "virtual pipeline 5", "23 chunks of 4 layers", "FITS",
                  "pipeline bubble: (PP-1)/(VP x m) = 3/(5 x 256) = 0.23%"):
        assert words in out, out
    rc, out, _ = _estimate_main(["--config", "configs/runs/llama2-70b-tempnet.yaml", "--nodes",
                                 "16", "--recompute-granularity", "full", "--recompute-method",
                                 "block", "--recompute-num-layers", "2",
                                 "--virtual-pipeline-model-parallel-size", "1"], capsys)
    assert rc == 0
    for words in ("recompute full block 2 (the first 2 layer(s) of each model chunk)",
                  "virtual pipeline off", "20 layers: 2 recomputed", "18 kept",
                  "x 4 micro-batches in flight", "= 3/(1 x 256) = 1.17%"):
        assert words in out, out
    rc, _, err = _estimate_main(["--config", "configs/runs/llama2-70b-tempnet.yaml", "--nodes",
                                 "16", "--virtual-pipeline-model-parallel-size", "3"], capsys)
    assert rc == 2 and "does not divide the 20 layers" in err
    rc, out, _ = _estimate_main(["--config", "configs/runs/llama2-70b-tempnet.yaml", "--nodes",
                                 "64"], capsys)  # DP 16: 64 micro-batches, a multiple of 4
    assert rc == 0 and "= 3/(5 x 64) = 0.94%" in out
    rc, _, err = _estimate_main(["--config", "configs/runs/gpt2-125m-tempnet.yaml", "--nodes",
                                 "1", "--sequence-parallel"], capsys)
    assert rc == 2 and "--sequence-parallel needs --tensor-model-parallel-size >= 2" in err


def test_cli_prints_the_breakdown():
    out = subprocess.run([sys.executable, "tools/estimate.py", "--config",
                          "configs/runs/llama2-7b-tempnet.yaml", "--nodes", "4"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    for word in ("TP=2 PP=1 DP=16", "weights", "gradients", "optimizer", "activations",
                 "FITS", "why:", "FLOPs per step"):
        assert word in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "tools/estimate.py", "--model", "llama2-7b",
                          "--params-only"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "6,738,415,616 parameters without TempNet" in out.stdout, out.stdout + out.stderr

"""tools/estimate.py (megatron_tempnet/experiments/estimate.py) against hand counts and real
built models.

Validated here: parameter counts exactly (tiny LLaMA and GPT, with and without TempNet, tied and
untied, against sum(p.numel()) of the model build_tempnet_model builds); weights, gradient
buffers and optimizer states in bytes against the tensors megatron-core's DDP and optimizers
allocate on the CPU (fp32 and bf16, distributed optimizer on and off, at DP=1); one layer's
stored activations against the tensors autograd saves (unfused attention, fp32, CPU).
Not validated here: activations with flash attention / Transformer Engine, fp16/bf16 activation
memory, TP/SP divisions, pipeline in-flight micro-batches, allocator overheads (GPU only).
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_tempnet.arguments import parse_args
from megatron_tempnet.config import TrainConfig, load_model_preset
from megatron_tempnet.experiments.estimate import (Layout, count_parameters, estimate_memory,
                                                   layer_activation_bytes, layout_from_run,
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
    assert run.train.seq_length == (1024 if "gpt2" in script else 4096)
    mem = estimate_memory(run.model, layout, run.tempnet)
    assert mem.fits, (script, mem.total / 2**30)


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

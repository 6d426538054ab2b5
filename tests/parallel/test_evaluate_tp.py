"""Validation metrics at TP=2, PP=2 and DP=2 equal the single-process (TP=1) evaluation, every
key compared (the temperature tools' included).

One torchrun launch (tests/workers/evaluate_worker.py) runs every layout; the reference is
``evaluate`` in this process at TP=1 on the same weights and micro-batches (itself checked
against a dense reference in tests/unit/test_evaluate.py). Every rank must return the same dict
(broadcast from the last stage), with the best temperature chosen identically.
"""
import dataclasses
import math

import pytest
import torch

from megatron_tempnet.config import load_model_preset
from megatron_tempnet.models.sharding import model_tensors
from megatron_tempnet.models.tempnet_gpt import build_tempnet_model
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.evaluate import evaluate
from batches import random_batches
from torchrun import run_torchrun

pytestmark = pytest.mark.parallel
RTOL = 1e-5  # fp32 logits; TP reorders the vocabulary sums

# name -> (loss_mode, (tp, pp)); world size 2, so DP = 2 / (tp * pp)
LAYOUTS = {
    "tempnet TP=2": ("tempnet_dro", (2, 1)),
    "tempnet PP=2": ("tempnet_dro", (1, 2)),
    "fixed tau DP=2": ("dro_fixed_tau", (1, 1)),
}
NUM_BATCHES, MICRO, SEQ = 2, 4, 16  # 2 global batches of 4 micro-batches [2, 16]
# the temperature tools (vocab-parallel entropy and confidence: the same at TP=2 as at TP=1)
TOOL_KEYS = ("ppl entropy T", "ece entropy T", "entropy T mean", "ppl ensemble", "ece ensemble",
             "ppl threshold T", "ece threshold T", "threshold confident fraction",
             "temperature tools")


def tiny_model(single_process, loss_mode):
    """tiny-llama (V = 200, padded to 256 at TP = 1 and 2) with sharp logits and a TempNet
    whose tau varies (as tests/unit/test_evaluate.py)."""
    torch.manual_seed(0)
    cfg = load_model_preset("tiny-llama", vocab_size=200)
    tcfg = TempNetConfig(loss_mode=loss_mode, hidden_size=32, fixed_tau=0.7)
    model = build_tempnet_model(cfg, tcfg, single_process, seed=3)
    with torch.no_grad():
        model.output_layer.weight.mul_(5.0)
        for name, p in model.named_parameters():
            if p.dim() <= 1 or name.startswith("tempnet."):  # random norms and pooling
                p.add_(torch.randn_like(p) * 0.2)
    return cfg, model


def make_batches(vocab, n, b=2, s=SEQ, seed=11):
    return random_batches(vocab, n, b, s, seed)


def assert_same(result, ref, where):
    assert set(result) == set(ref), (where, set(result) ^ set(ref))
    for key, value in ref.items():
        if key == "tau histogram":
            assert result[key]["counts"] == value["counts"], where
        elif key == "temperature grid":
            got = torch.tensor(result[key], dtype=torch.float64)
            torch.testing.assert_close(got, torch.tensor(value, dtype=torch.float64),
                                       rtol=RTOL, atol=1e-6, msg=f"{where}: {key}")
        elif key == "temperature tools":  # the tools' settings
            assert result[key] == value, (where, result[key], value)
        elif value is None:  # "r2 tau*" / "pearson tau*" when tau* has no spread
            assert result[key] is None, (where, key, result[key])
        else:
            assert math.isclose(result[key], value, rel_tol=RTOL, abs_tol=1e-6), \
                (where, key, result[key], value)


def test_evaluate_tp_pp_dp_match_single_process(single_process, tmp_path):
    cases, refs = {}, {}
    for name, (mode, layout) in LAYOUTS.items():
        cfg, model = tiny_model(single_process, mode)
        batches = make_batches(cfg.vocab_size, NUM_BATCHES * MICRO)
        refs[name] = evaluate([model], iter(batches), NUM_BATCHES, single_process,
                              seq_length=SEQ, micro_batch_size=2, num_microbatches=MICRO)
        cases[name] = {"cfg": dataclasses.asdict(cfg),
                       "tempnet": dataclasses.asdict(model.tempnet_config),
                       "full": model_tensors(model), "micro_batches": batches,
                       "num_batches": NUM_BATCHES, "seq_length": SEQ, "micro_batch_size": 2,
                       "layout": layout}
    torch.save(cases, tmp_path / "cases.pt")
    ranks = run_torchrun("evaluate_worker.py", tmp_path, str(tmp_path / "cases.pt"))

    for name, (mode, _) in LAYOUTS.items():
        assert ("ppl tempnet" in refs[name]) == (mode == "tempnet_dro")
        assert set(TOOL_KEYS) <= set(refs[name]), name  # compared below like every key
        for rank, per_rank in enumerate(ranks):
            got = per_rank[name]
            assert got["training"], f"{name}: model left in eval mode"
            assert_same(got["result"], refs[name], f"{name} rank {rank}")
        assert ranks[0][name]["result"]["best T"] == ranks[1][name]["result"]["best T"]

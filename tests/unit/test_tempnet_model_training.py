"""Training with TempNet (one process, megatron-core DDP + optimizer + the train loop).

- frozen_lm: LM parameters stay bit-identical, TempNet's move, the optimizer holds no LM state;
- TempNet's parameter group: constant lr while the LM's warms up and decays (or, with
  lr_schedule "lm", the LM's schedule scaled to TempNet's peak), its own weight decay;
- a tiny LLaMA + TempNet learns a noisy repeating token stream: the DRO loss and the tempered CE
  fall, tau stays within its bounds, nothing is NaN;
- the training tau histogram: each log line's counts cover every token the loss kept over its
  log window, and reach TensorBoard (read back) and the JSONL file through the metrics sinks.
"""
import json
import math

import pytest
import torch

from megatron_tempnet.config import TrainConfig, load_model_preset
from megatron_tempnet.models.tempnet_gpt import (TEMPNET_PARAM_ATTR, build_tempnet_model,
                                                 loss_channels)
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training.ddp import wrap_ddp
from megatron_tempnet.training.loop import TrainLoop
from megatron_tempnet.training.config import LoggingConfig
from megatron_tempnet.training.metrics_log import MetricsCallback, MetricsLogger, Throughput
from megatron_tempnet.training.optim import build_optimizer, build_scheduler
from megatron_tempnet.training.reports import ReportSpec
from megatron_tempnet.training.step import megatron_step

TAU_HISTOGRAM_BINS = ReportSpec().histogram_bins


def train(chunks, optimizer, scheduler, batches, tr, ctx, tcfg, histogram=False, **kw):
    """The train loop over the megatron-core step of a model built for ``tcfg`` (with the tau
    histogram over its bounds when ``histogram``)."""
    spec = ReportSpec(loss_channels(tcfg), tcfg.tau_range if histogram else None)
    return TrainLoop(megatron_step(chunks, optimizer, scheduler, tr, spec), batches, tr, ctx,
                     spec=spec, **kw).train()

VOCAB = 256


def noisy_cycle_batches(batch: int, seq: int, seed: int = 0, noise: float = 0.1):
    """Endless micro-batches of a learnable stream: next = perm[token] (else uniform noise)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=gen)
    while True:
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
        for i in range(seq):
            noisy = torch.rand(batch, generator=gen) < noise
            tokens[:, i + 1] = torch.where(noisy, torch.randint(0, VOCAB, (batch,), generator=gen),
                                           perm[tokens[:, i]])
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
               "position_ids": torch.arange(seq).expand(batch, seq).contiguous(),
               "loss_mask": torch.ones(batch, seq)}


def setup(ctx, tcfg, train_cfg, distributed=False):
    torch.manual_seed(0)
    model = build_tempnet_model(load_model_preset("tiny-llama", vocab_size=VOCAB), tcfg, ctx,
                                seed=5)
    chunks = [wrap_ddp(model, use_distributed_optimizer=distributed)]
    optimizer = build_optimizer(chunks, train_cfg, use_distributed_optimizer=distributed,
                                tempnet_cfg=tcfg)
    return model, chunks, optimizer, build_scheduler(optimizer, train_cfg)


def is_tempnet(p):
    return getattr(p, TEMPNET_PARAM_ATTR, False)


@pytest.mark.parametrize("distributed", [False, True])
def test_frozen_lm_trains_tempnet_only(single_process, distributed):
    tcfg = TempNetConfig(loss_mode="tempnet_dro", training_mode="frozen_lm", hidden_size=32,
                         lr=1e-2, rho=3.0)
    tr = TrainConfig(micro_batch_size=4, global_batch_size=4, seq_length=16, train_iters=3,
                     lr=1e-3, lr_warmup_iters=1, log_interval=1)
    model, chunks, optimizer, scheduler = setup(single_process, tcfg, tr, distributed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm = [p for p in model.parameters() if not is_tempnet(p)]
    assert lm and not any(p.requires_grad or hasattr(p, "main_grad") for p in lm)

    state = train(chunks, optimizer, scheduler, noisy_cycle_batches(4, 16), tr, single_process,
                  tcfg, log=lambda line: None)
    assert len(state.metrics) == 3 and all(math.isfinite(v) for _, m in state.metrics
                                           for v in m.values())
    for name, p in model.named_parameters():  # bit-identical LM, every TempNet tensor moved
        assert torch.equal(p, before[name]) != name.startswith("tempnet."), name
    # the optimizer holds state for TempNet's parameters only (no LM params in any group)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    tempnet_numel = sum(p.numel() for p in model.tempnet.parameters())
    assert sum(p.numel() for p in grouped) == tempnet_numel
    state_numel = sum(s["exp_avg"].numel() for s in optimizer.optimizer.state.values())
    assert state_numel == tempnet_numel


@pytest.mark.parametrize("schedule", ["constant", "lm"])
def test_tempnet_group_keeps_its_own_lr(single_process, schedule):
    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=32, lr=2e-6, weight_decay=0.01,
                         lr_schedule=schedule)
    tr = TrainConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=3, lr_decay_style="cosine",
                     train_iters=10, weight_decay=0.1)
    model, _, optimizer, scheduler = setup(single_process, tcfg, tr)
    tempnet_ids = {id(p) for p in model.tempnet.parameters()}
    groups = [(g, {id(p) for p in g["params"]}) for g in optimizer.param_groups if g["params"]]
    tempnet_groups = [g for g, ids in groups if ids & tempnet_ids]
    assert len(tempnet_groups) == 1 and {id(p) for p in tempnet_groups[0]["params"]} == tempnet_ids
    group = tempnet_groups[0]
    lm_groups = [g for g, ids in groups if not ids & tempnet_ids]
    assert {g["weight_decay"] for g in lm_groups} == {0.0, 0.1}  # biases/norms: none
    lm_lrs, tempnet_lrs = [], []
    for _ in range(12):
        scheduler.step(1)
        assert {g["lr"] for g in lm_groups} == {lm_groups[0]["lr"]}
        lm_lrs.append(lm_groups[0]["lr"])
        tempnet_lrs.append(group["lr"])
        assert group["weight_decay"] == 0.01
    assert lm_lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warmup
    assert all(a > b for a, b in zip(lm_lrs[2:10], lm_lrs[3:10]))  # cosine decay
    assert lm_lrs[-1] == pytest.approx(1e-4)
    if schedule == "constant":
        assert tempnet_lrs == [2e-6] * 12
    else:
        assert tempnet_lrs == pytest.approx([lr * 2e-6 / 1e-3 for lr in lm_lrs])

    # an optimizer state round trip (resume) keeps TempNet's group apart from the LM's
    saved = optimizer.state_dict()
    _, _, fresh, _ = setup(single_process, tcfg, tr)
    fresh.load_state_dict(saved)
    restored = [g for g in fresh.param_groups if g.get("is_decoupled_lr")]
    assert len(restored) == 1 and restored[0]["lr"] == group["lr"]
    assert sum(p.numel() for p in restored[0]["params"]) == \
        sum(p.numel() for p in model.tempnet.parameters())


def test_tiny_llama_with_tempnet_learns(single_process):
    log_v = math.log(VOCAB)
    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=64, lr=1e-3, rho=log_v - 2.83)
    tr = TrainConfig(micro_batch_size=8, global_batch_size=8, seq_length=32, train_iters=24,
                     lr=1e-2, min_lr=1e-3, lr_warmup_iters=2, log_interval=4)
    _, chunks, optimizer, scheduler = setup(single_process, tcfg, tr)
    lines = []
    state = train(chunks, optimizer, scheduler, noisy_cycle_batches(8, 32, seed=1), tr,
                  single_process, tcfg, log=lines.append)
    metrics = [m for _, m in state.metrics]
    assert len(metrics) == 6 and "tau" in lines[-1] and "dro loss" in lines[-1]
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert all(tcfg.tau_min <= m["tau min"] <= m["tau max"] <= tcfg.tau_max for m in metrics)
    first, last = metrics[0], metrics[-1]
    assert last["dro loss"] < first["dro loss"] - 1.0, (first, last)  # ~7.3 -> ~4.1
    assert last["tempered ce"] < first["tempered ce"] - 0.5, (first, last)  # ~5.4 -> ~4.3
    assert last["lm loss"] < first["lm loss"] - 1.0, (first, last)  # plain CE: ~5.0 -> ~2.4


def test_training_tau_histogram_covers_the_log_window(single_process, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tcfg = TempNetConfig(loss_mode="tempnet_dro", hidden_size=32, lr=1e-3, tau_min=0.5,
                         tau_max=3.0)
    tr = TrainConfig(micro_batch_size=2, global_batch_size=4, seq_length=16, train_iters=7,
                     lr=1e-3, lr_warmup_iters=1, log_interval=3)
    _, chunks, optimizer, scheduler = setup(single_process, tcfg, tr)
    kept = []  # tokens the loss keeps, per micro-batch (2 per iteration)

    def masked(stream, gen=torch.Generator().manual_seed(3)):
        for batch in stream:
            batch["loss_mask"] = (torch.rand(2, 16, generator=gen) > 0.3).float()
            kept.append(int(batch["loss_mask"].sum()))
            yield batch

    logging = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"),
                            metrics_jsonl=str(tmp_path / "metrics.jsonl"))
    with MetricsLogger(logging, single_process) as logger:
        sink = MetricsCallback(logger)
        state = train(chunks, optimizer, scheduler, masked(noisy_cycle_batches(2, 16)), tr,
                      single_process, tcfg, histogram=True, log=lambda line: None,
                      callbacks=[sink],
                      throughput=Throughput(flops_per_token=1e6))
    per_iter = [a + b for a, b in zip(kept[::2], kept[1::2])]
    windows = {3: sum(per_iter[:3]), 6: sum(per_iter[3:6]), 7: per_iter[6]}
    edges = torch.linspace(0.5, 3.0, TAU_HISTOGRAM_BINS + 1, dtype=torch.float64).tolist()
    assert [i for i, _ in state.metrics] == [3, 6, 7] and len(set(per_iter)) > 1
    for iteration, m in state.metrics:
        hist = m["tau histogram"]
        assert hist["edges"] == edges and len(hist["counts"]) == TAU_HISTOGRAM_BINS
        assert sum(hist["counts"]) == windows[iteration], (iteration, hist, windows)
        filled = [i for i, c in enumerate(hist["counts"]) if c]  # the logged batch's tau inside
        assert edges[filled[0]] <= m["tau min"] <= m["tau max"] <= edges[filled[-1] + 1]

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    got = acc.Histograms("train/tau")
    assert [(h.step, h.histogram_value.num) for h in got] == sorted(windows.items())
    assert list(got[0].histogram_value.bucket) == state.metrics[0][1]["tau histogram"]["counts"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sum(r["tau histogram"]) for r in lines] == [windows[i] for i in (3, 6, 7)]
    assert lines[0]["tau histogram edges"] == edges
    assert all("tau histogram edges" not in r for r in lines[1:])


@pytest.mark.parametrize("distributed", [False, True])
def test_frozen_lm_scale_aware_starts_at_the_best_global_temperature(single_process,
                                                                      distributed):
    """No --tempnet-tau0 with frozen_lm: TempNet starts at the frozen LM's best global T on the
    first training batches (every token), and trains on from there (the optimizer's copy of
    b_out follows the model: the first update moves it from the calibrated value)."""
    from megatron_tempnet.arguments import RunConfig
    from megatron_tempnet.train import calibrate_initial_tau
    from megatron_tempnet.training.config import EvalConfig
    from megatron_tempnet.training.evaluate import evaluate

    tcfg = TempNetConfig(loss_mode="tempnet_ce", training_mode="frozen_lm", hidden_size=32,
                         arch="scale_aware", lr=1e-3, tau_min=0.05, tau_max=20.0)
    tr = TrainConfig(micro_batch_size=4, global_batch_size=8, seq_length=16, train_iters=1,
                     lr=1e-3, min_lr=1e-3, lr_warmup_iters=0)
    run = RunConfig(train=tr, tempnet=tcfg, eval=EvalConfig(eval_iters=2))
    model, chunks, optimizer, scheduler = setup(single_process, tcfg, tr, distributed)
    with torch.no_grad():  # an untrained LM made sharp: its best global T is the grid's top
        model.output_layer.weight.mul_(6.0)
    probe = lambda: noisy_cycle_batches(4, 16, seed=9)  # noqa: E731
    tau = calibrate_initial_tau(run, chunks, optimizer, single_process, probe)
    best = evaluate(chunks, iter(probe()), 2, single_process, seq_length=16, micro_batch_size=4,
                    num_microbatches=2, config=run.eval)["best T"]
    top = math.exp(math.log(20.0) - 1e-3 * math.log(20.0 / 0.05))  # clamped inside the bounds
    assert best > 10 and tau == pytest.approx(min(best, top), rel=1e-6)
    batch = next(noisy_cycle_batches(4, 16, seed=1))
    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
        torch.testing.assert_close(model.tempnet(logits), torch.full((4, 16), tau), rtol=1e-5,
                                   atol=0)
    model.train()
    start = float(model.tempnet.b_out)
    train(chunks, optimizer, scheduler, noisy_cycle_batches(4, 16), tr, single_process, tcfg,
          log=lambda _: None)
    assert float(model.tempnet.b_out) != start and abs(float(model.tempnet.b_out) - start) < 0.01
    # a head that is not at its init (resumed, loaded) and an explicit tau0 are left alone
    assert calibrate_initial_tau(run, chunks, optimizer, single_process, probe) is None
    explicit = RunConfig(train=tr, tempnet=TempNetConfig(**{**tcfg.__dict__, "tau0": 1.0}))
    assert calibrate_initial_tau(explicit, chunks, optimizer, single_process, probe) is None

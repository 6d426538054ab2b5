"""Metrics sinks (training/metrics_log.py): JSONL contents, TensorBoard event file (read back
with tensorboard's EventAccumulator), writer rank, console line, callbacks; the training tau
histogram's report (training/step.py) and its sinks."""
import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from megatron_tempnet.config import ConfigError
from megatron_tempnet.training.config import LoggingConfig
from megatron_tempnet.training.metrics_log import (MetricsCallback, MetricsLogger, format_duration,
                                                   format_train_line, is_writer_rank,
                                                   tau_histogram, train_metrics)
from megatron_tempnet.training.step import (TAU_HISTOGRAM, ReportSpec, global_metrics,
                                            masked_sum_loss)

CHANNELS = ("loss", "ce", "tempered_ce", "tau")
WITH_RANGE = ReportSpec(CHANNELS, (0.5, 4.5))
TAU_HISTOGRAM_BINS = WITH_RANGE.histogram_bins


def ctx_at(pp_rank=0, pp_size=1, tp_rank=0, dp_rank=0):
    return SimpleNamespace(is_last_stage=pp_rank == pp_size - 1, tp_rank=tp_rank,
                           dp_rank=dp_rank, dp_group=None, world_size=1,
                           device=torch.device("cpu"))


EVAL = {"eval tokens": 100.0, "accuracy": 0.25, "ppl tau=1": 1650.0, "ece tau=1": 0.3,
        "ppl tempnet": 54.0, "ece tempnet": 0.05, "tau mean": 2.7, "best T": 2.5,
        "ppl best T": 50.0, "ece best T": 0.02,
        "tau histogram": {"edges": [0.5, 2.75, 5.0], "counts": [30.0, 70.0]},
        "temperature grid": [[1.0, 1650.0, 0.3], [2.5, 50.0, 0.02]]}


def train_dict():
    reduced = {"lm loss": 3.0, "dro loss": 1.5, "tempered ce": 2.0, "tau": 2.7, "tau min": 0.6,
               "tau max": 4.9}
    return train_metrics(reduced, lr=1e-3, grad_norm=0.5, elapsed_s=2.0, iterations=4,
                         tokens_per_iteration=1000, flops_per_token=1e9, world_size=2,
                         peak=1e12, device=torch.device("cpu"))


def test_train_metrics_and_console_line():
    m = train_dict()
    assert m["tokens/s"] == 2000.0 and m["TFLOP/s/GPU"] == 2000.0 * 1e9 / 2 / 1e12
    assert math.isclose(m["MFU"], 1.0) and m["ms/iter"] == 500.0
    assert math.isclose(m["ppl"], math.exp(3.0)) and m["mem rss GiB"] > 0
    line = format_train_line(8, 100, m)
    assert line.startswith("iteration      8/100 | lr 1.000e-03 | lm loss 3.0000")
    assert "tau 2.700 | [0.600, 4.900]" in line and "MFU 100.0%" in line
    plain = format_train_line(1, 2, {"lm loss": 2.0})
    assert plain == "iteration      1/2 | lm loss 2.0000"


def test_jsonl_records_and_writer_rank(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    cfg = LoggingConfig(metrics_jsonl=str(path))
    with MetricsLogger(cfg, ctx_at()) as logger:
        logger.log_train(10, train_dict())
        logger.log_train(20, {**train_dict(), "lm loss": float("nan")})
        logger.log_eval(20, EVAL)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in lines] == [("train", 10), ("train", 20),
                                                            ("valid", 20)]
    assert lines[0]["lm loss"] == 3.0 and lines[0]["lr"] == 1e-3 and "MFU" in lines[0]
    assert lines[1]["lm loss"] == "nan"  # strict JSON
    assert lines[2]["ppl tempnet"] == 54.0 and lines[2]["tau histogram"]["counts"] == [30, 70]
    # only the last stage's tp 0 / dp 0 rank writes
    assert is_writer_rank(ctx_at(pp_rank=1, pp_size=2))
    for other in (ctx_at(pp_rank=0, pp_size=2), ctx_at(tp_rank=1), ctx_at(dp_rank=1)):
        assert not is_writer_rank(other)
        other_path = tmp_path / f"other{id(other)}.jsonl"
        with MetricsLogger(LoggingConfig(metrics_jsonl=str(other_path)), other) as logger:
            logger.log_train(1, train_dict())
        assert not other_path.exists()


def test_tensorboard_event_file_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    with MetricsLogger(LoggingConfig(tensorboard_dir=str(tb)), ctx_at()) as logger:
        logger.log_train(10, train_dict())
        logger.log_train(20, train_dict())
        logger.log_eval(20, EVAL)
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    for name in ("train/lm_loss", "train/lr", "train/tau_min", "train/grad_norm",
                 "train/TFLOP/s/GPU", "train/MFU", "train/mem_rss_GiB", "valid/ppl_tau_1",
                 "valid/ppl_tempnet", "valid/ece_best_T", "valid/best_T"):
        assert name in tags["scalars"], (name, tags["scalars"])
    assert [e.step for e in acc.Scalars("train/lm_loss")] == [10, 20]
    assert acc.Scalars("valid/ppl_tempnet")[0].value == pytest.approx(54.0)
    hist = acc.Histograms("valid/tau")[0]
    assert hist.step == 20 and hist.histogram_value.num == 100.0
    assert list(hist.histogram_value.bucket) == [30.0, 70.0]


def test_tau_histogram_and_config_errors():
    tau = torch.tensor([0.5, 1.0, 4.99, 5.0, 3.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    counts = tau_histogram(tau, mask, 0.5, 5.0, bins=3)
    assert counts.tolist() == [2.0, 0.0, 2.0]
    with pytest.raises(ConfigError, match="peak-tflops"):
        LoggingConfig(peak_tflops=-1.0).validate()


@dataclass
class _State:
    iteration: int
    metrics: list  # what the loop logged: (iteration, metrics reduced over DP)


def test_metrics_callback_logs_on_interval(tmp_path):
    path = tmp_path / "m.jsonl"
    train_cfg = SimpleNamespace(log_interval=2, train_iters=5, global_batch_size=4, seq_length=8)
    logger = MetricsLogger(LoggingConfig(metrics_jsonl=str(path)), ctx_at())
    cb = MetricsCallback(logger)
    logged = []
    for it in range(1, 6):
        if it % train_cfg.log_interval == 0 or it == train_cfg.train_iters:  # the loop logs
            logged.append((it, train_metrics({"lm loss": 2.0}, lr=0.1, grad_norm=1.0,
                                             elapsed_s=1.0, iterations=2,
                                             tokens_per_iteration=32, flops_per_token=1e6,
                                             world_size=1, peak=None,
                                             device=torch.device("cpu"))))  # its one record
        cb(_State(it, logged), SimpleNamespace(reports=[], lr=0.1, grad_norm=1.0))
    logger.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [2, 4, 5]
    assert lines[0]["lm loss"] == 2.0 and "MFU" not in lines[0] and lines[0]["tokens/s"] > 0


def test_masked_sum_loss_tau_histogram_report():
    """The histogram rides with the sums: counts over the kept tokens (loss-mask weighted),
    outliers in the edge bins, summed over micro-batches; no histogram without a tau or a range;
    global_metrics' window replaces the reports' own counts."""
    gen = torch.Generator().manual_seed(0)
    tau = torch.rand(2, 8, generator=gen) * 4.0 + 0.5  # inside [0.5, 4.5]
    tau[0, 0], tau[0, 1], tau[1, 7] = 0.1, 9.0, 4.5  # below, above, on the upper bound
    output = torch.cat([torch.rand(2, 8, 3, generator=gen), tau.unsqueeze(-1)], -1)
    mask = torch.ones(2, 8)
    mask[1, :3] = 0.0  # 13 kept tokens
    loss, count, reports = masked_sum_loss(mask, output, WITH_RANGE)
    counts = reports[TAU_HISTOGRAM]
    assert counts.shape == (TAU_HISTOGRAM_BINS,) and counts.dtype == torch.float64
    assert counts.sum() == count == 13
    kept = tau[mask != 0]
    expected = torch.histc(kept.clamp(0.5, 4.5 - 1e-6).double(), TAU_HISTOGRAM_BINS, 0.5, 4.5)
    assert torch.equal(counts, expected)
    assert counts[0] >= 1 and counts[-1] >= 2  # 0.1 in the first bin; 9.0 and 4.5 in the last
    assert TAU_HISTOGRAM not in masked_sum_loss(mask, output, ReportSpec(CHANNELS))[2]  # no range
    assert TAU_HISTOGRAM not in masked_sum_loss(mask, output[..., 0])[2]  # plain CE: no tau

    _, _, second = masked_sum_loss(torch.ones(2, 8), output, WITH_RANGE)
    metrics = global_metrics([reports, second], None)
    assert metrics[TAU_HISTOGRAM].sum() == 13 + 16 and torch.equal(
        metrics[TAU_HISTOGRAM], counts + second[TAU_HISTOGRAM])
    assert metrics["tau"] == pytest.approx(float((kept.sum() + tau.sum()) / 29), rel=1e-6)
    window = {TAU_HISTOGRAM: 3 * counts}  # the loop's sum over a log window
    assert torch.equal(global_metrics([reports], None, window)[TAU_HISTOGRAM], 3 * counts)


def test_train_tau_histogram_sinks(tmp_path):
    """log_train: TensorBoard histogram train/tau per call; JSONL counts on every line, the
    edges on the first one only (and again when they change)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    edges = torch.linspace(0.5, 4.5, 5).tolist()
    hists = [{"edges": edges, "counts": [0.0, 3.0, 5.0, 0.0]},
             {"edges": edges, "counts": [1.0, 1.0, 1.0, 1.5]},
             {"edges": [0.0, 1.0, 2.0], "counts": [2.0, 2.0]}]
    cfg = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"),
                        metrics_jsonl=str(tmp_path / "m.jsonl"))
    with MetricsLogger(cfg, ctx_at()) as logger:
        for it, hist in zip((4, 8, 12), hists):
            logger.log_train(it, {**train_dict(), "tau histogram": hist})
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["tau histogram"] for r in lines] == [[0, 3, 5, 0], [1, 1, 1, 1.5], [2, 2]]
    assert lines[0]["tau histogram edges"] == edges and "tau histogram edges" not in lines[1]
    assert lines[2]["tau histogram edges"] == [0.0, 1.0, 2.0]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    got = acc.Histograms("train/tau")
    assert [h.step for h in got] == [4, 8, 12]
    first = got[0].histogram_value
    assert first.num == 8.0 and list(first.bucket) == [0.0, 3.0, 5.0, 0.0]
    assert list(first.bucket_limit) == pytest.approx(edges[1:])
    assert first.min == pytest.approx(1.5) and first.max == pytest.approx(3.5)  # non-empty bins
    assert "train/tau_histogram" not in acc.Tags()["scalars"]


def test_eta_in_the_record_and_the_line():
    m = train_metrics({"lm loss": 2.0}, lr=1e-3, grad_norm=None, elapsed_s=2.0, iterations=4,
                      tokens_per_iteration=10, flops_per_token=0, world_size=1, peak=None,
                      device=torch.device("cpu"), remaining_iterations=7500)
    assert m["eta s"] == 0.5 * 7500 and "TFLOP/s/GPU" not in m  # no FLOPs per token given
    assert "ETA 01:02:30" in format_train_line(2500, 10000, m)
    assert format_duration(59) == "00:59" and format_duration(90061) == "1d 01:01:01"


def test_report_spec_names_the_channels():
    """The reports come from the spec's channel names, not from positions: a model whose
    channels come in another order is reported right; a count mismatch is an error."""
    gen = torch.Generator().manual_seed(1)
    output = torch.rand(2, 8, 4, generator=gen)
    mask = torch.ones(2, 8)
    _, _, reports = masked_sum_loss(mask, output, ReportSpec(CHANNELS))
    _, _, swapped = masked_sum_loss(mask, output.flip(-1), ReportSpec(CHANNELS[::-1]))
    assert reports.keys() == swapped.keys()
    for key in reports:
        assert torch.equal(reports[key], swapped[key]), key
    assert reports["lm loss"][0] == pytest.approx(float(output[..., 1].sum()), rel=1e-6)
    with pytest.raises(ValueError, match="4 per-token channels"):
        masked_sum_loss(mask, output, ReportSpec(CHANNELS[:3]))
    assert ReportSpec(CHANNELS).losses == ("lm loss", "dro loss", "tempered ce")
    assert ReportSpec().losses == ("lm loss",)
    with pytest.raises(ValueError, match="no report name"):
        ReportSpec(("loss", "entropy"))

"""Checkpoint directory layout, --load resolution, the shape check, and RunControl's decisions
(signals, time limit, NaN / Inf, loss spikes), in one process. The save / load round trips run
under torchrun in tests/parallel/test_checkpointing.py."""
import os
import signal
import time

import pytest
import torch

from megatron_tempnet.arguments import parse_args
from megatron_tempnet.config import ConfigError, ModelConfig, TrainConfig
from megatron_tempnet.tempnet import TempNetConfig
from megatron_tempnet.training import save_dir
from megatron_tempnet.training.checkpoint_config import CheckpointConfig
from megatron_tempnet.training.checkpoint_layout import (LATEST_FILE, iteration_dir,
                                                         prune_checkpoints, read_latest,
                                                         resolve_load_dir, saved_iterations,
                                                         write_latest)
from megatron_tempnet.training.checkpointing import Checkpointer
from megatron_tempnet.training.rng_state import get_rng_state, set_rng_state
from megatron_tempnet.training.run_control import (EXIT_CODE_PREEMPTED, EXIT_CODE_TIME_LIMIT,
                                                   RunControl, TrainingDiverged)
from megatron_tempnet.training.run_record import run_record, shape_mismatches


def make_checkpoint(root, iteration, complete=True):
    path = iteration_dir(root, iteration)
    path.mkdir(parents=True)
    if complete:
        (path / "metadata.json").write_text("{}")
    return path


def test_latest_marker_round_trip_is_atomic(tmp_path):
    assert read_latest(tmp_path) is None
    write_latest(tmp_path, 100)
    write_latest(tmp_path, 200)
    assert read_latest(tmp_path) == 200
    assert [p.name for p in tmp_path.iterdir()] == [LATEST_FILE]  # no temp file left behind
    (tmp_path / LATEST_FILE).write_text("garbage")
    with pytest.raises(ConfigError, match="not an iteration number"):
        read_latest(tmp_path)


def test_prune_keeps_the_newest_and_never_the_current_or_unfinished(tmp_path):
    for i in (10, 20, 30, 40, 50):
        save_dir.write_writer(make_checkpoint(tmp_path, i, complete=i != 50), "ours", i)
    write_latest(tmp_path, 40)  # 50: a save that never finished
    assert prune_checkpoints(tmp_path, keep_last=2, lineage="ours") == [10, 20]
    assert saved_iterations(tmp_path) == [30, 40, 50]
    assert prune_checkpoints(tmp_path, keep_last=1, lineage="ours") == [30]
    assert saved_iterations(tmp_path) == [40, 50]


def test_prune_never_deletes_what_another_run_wrote(tmp_path):
    save_dir.write_writer(make_checkpoint(tmp_path, 10), "other", 10)
    make_checkpoint(tmp_path, 20)  # no writer.json: unknown origin
    for i in (30, 40):
        save_dir.write_writer(make_checkpoint(tmp_path, i), "ours", i)
    write_latest(tmp_path, 40)
    assert prune_checkpoints(tmp_path, keep_last=1, lineage="ours") == [30]
    assert saved_iterations(tmp_path) == [10, 20, 40]


def test_load_dir_resolution_and_its_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_load_dir(str(tmp_path / "missing"), save=None)
    # the first job of a requeued series: --load == --save and nothing saved yet
    assert resolve_load_dir(str(tmp_path / "run"), save=str(tmp_path / "run")) is None

    make_checkpoint(tmp_path, 5, complete=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"no latest_checkpointed_iteration.txt in it \(it "
                                          r"holds iter_0000005/, notes.txt\)"):
        resolve_load_dir(str(tmp_path), save=None)
    write_latest(tmp_path, 5)
    with pytest.raises(ConfigError, match="says 5 but .*iter_0000005 is missing or incomplete"):
        resolve_load_dir(str(tmp_path), save=None)

    done = make_checkpoint(tmp_path, 7)
    write_latest(tmp_path, 7)
    assert resolve_load_dir(str(tmp_path), save=None) == done
    assert resolve_load_dir(str(done), save=None) == done  # one checkpoint directory itself


def record(model=None, tempnet=None):
    ctx = type("Ctx", (), {"tp_size": 2, "pp_size": 1, "dp_size": 1})
    return run_record(model or ModelConfig(vocab_size=500), tempnet or TempNetConfig(),
                      TrainConfig(), ctx)


def test_shape_mismatches_name_the_fields():
    saved = record()
    assert shape_mismatches(saved, record(), finetune=False) == []
    other = record(ModelConfig(vocab_size=500, hidden_size=128, num_layers=3))
    assert shape_mismatches(saved, other, finetune=False) == [
        "num_layers: checkpoint 2, this run 3", "hidden_size: checkpoint 64, this run 128",
        "ffn_hidden_size: checkpoint 256, this run 512"]
    # training-only fields do not matter
    assert shape_mismatches(saved, record(ModelConfig(vocab_size=500, hidden_dropout=0.3)),
                            finetune=False) == []


def test_tempnet_in_the_shape_check():
    ce, dro = record(), record(tempnet=TempNetConfig(loss_mode="tempnet_dro", hidden_size=16))
    assert "tempnet loss_mode: checkpoint 'ce', this run 'tempnet_dro'" in \
        shape_mismatches(ce, dro, finetune=False)[0]
    assert shape_mismatches(ce, dro, finetune=True) == []  # TempNet keeps its init
    wider = record(tempnet=TempNetConfig(loss_mode="tempnet_dro", hidden_size=32))
    assert shape_mismatches(dro, wider, finetune=True) == [
        "tempnet hidden_size: checkpoint 16, this run 32"]


def test_checkpoint_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--save-interval 10 needs --save DIR"):
        CheckpointConfig(save_interval=10).validate()
    with pytest.raises(ConfigError, match="--keep-last 0"):
        CheckpointConfig(save="d", keep_last=0).validate()
    with pytest.raises(ConfigError, match="--loss-spike-factor 1"):
        CheckpointConfig(loss_spike_factor=1).validate()
    with pytest.raises(ConfigError, match="--exit-duration-in-mins 0"):
        CheckpointConfig(exit_duration_in_mins=0).validate()


def test_checkpoint_flags_megatron_style():
    run = parse_args(["--save", "ck", "--load", "ck", "--save-interval", "100", "--keep-last",
                      "3", "--exit-duration-in-mins", "230", "--finetune", "--no-load-optim",
                      "--exit-signal-handler", "false"])
    c = run.checkpoint
    assert (c.save, c.load, c.save_interval, c.keep_last, c.exit_duration_in_mins) == \
        ("ck", "ck", 100, 3, 230)
    assert c.finetune is True and c.no_load_optim is True and c.no_load_rng is False
    assert c.exit_signal_handler is False


def test_save_is_due_on_interval_and_when_stopping():
    ck = Checkpointer(CheckpointConfig(save="d", save_interval=5), [], None, None, None, {})
    assert [i for i in range(1, 12) if ck.due(i, stopping=False)] == [5, 10]
    assert ck.due(7, stopping=True)
    ck.last_saved = 10
    assert not ck.due(10, stopping=True)  # the end coincides with an interval save
    assert not Checkpointer(CheckpointConfig(), [], None, None, None, {}).due(5, stopping=True)


def report(loss=2.0, tokens=10.0, **extra):
    return {"lm loss": torch.tensor([loss * tokens, tokens]), **extra}


def test_run_control_raises_on_nan_loss_or_grad_norm():
    control = RunControl()
    assert control.check(1, [report()], grad_norm=1.0) is None
    with pytest.raises(TrainingDiverged, match=r"^iteration 5: non-finite .*without saving"):
        control.check(5, [report(), report(float("nan"))], grad_norm=1.0)
    with pytest.raises(TrainingDiverged, match="iteration 6: .*grad norm inf"):
        control.check(6, [report()], grad_norm=float("inf"))
    dro = report(**{"dro loss": torch.tensor([float("inf"), 10.0])})
    with pytest.raises(TrainingDiverged, match="iteration 7"):
        control.check(7, [dro], grad_norm=1.0)
    # an all-masked micro-batch's tau min/max are legitimately infinite
    tau = report(**{"tau min": torch.tensor([float("inf")])})
    assert control.check(8, [tau], grad_norm=1.0) is None
    assert control.check(9, [], grad_norm=None) is None  # a stage without reports


def test_run_control_stops_on_a_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with RunControl(CheckpointConfig()) as control:
        assert control.check(1, [report()], 1.0) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        stop = control.check(2, [report()], 1.0)
    assert stop.exit_code == EXIT_CODE_PREEMPTED and "iteration 2: received SIGUSR1" in stop.message
    assert signal.getsignal(signal.SIGUSR1) == before
    with RunControl(CheckpointConfig(exit_signal_handler=False)) as control:
        assert getattr(signal.getsignal(signal.SIGTERM), "__self__", None) is not control


def test_run_control_time_limit():
    control = RunControl(CheckpointConfig(exit_duration_in_mins=1), start_time=time.time() - 61)
    stop = control.check(3, [report()], 1.0)
    assert stop.exit_code == EXIT_CODE_TIME_LIMIT and "--exit-duration-in-mins 1" in stop.message
    assert RunControl(CheckpointConfig(exit_duration_in_mins=1)).check(3, [], None) is None


def test_loss_spike_stops_after_warmup():
    control = RunControl(CheckpointConfig(loss_spike_factor=2.0))
    assert control.check(1, [report(50.0)], 1.0) is None  # warmup: not judged
    for i in range(2, 40):
        assert control.check(i, [report(1.0)], 1.0) is None
    assert control.check(40, [report(1.9)], 1.0) is None
    with pytest.raises(TrainingDiverged, match=r"iteration 41: lm loss 9.0000 > "
                                               r"--loss-spike-factor 2.0 x running mean"):
        control.check(41, [report(9.0)], 1.0)
    plain = RunControl()  # off by default
    assert all(plain.check(i, [report(1e3 if i == 30 else 1.0)], 1.0) is None
               for i in range(1, 31))


def test_rng_state_round_trip(single_process):
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    state = get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draw():
        with tracker.fork():
            forked = torch.rand(3)
        return random.random(), np.random.rand(), torch.rand(3), forked

    first = draw()
    set_rng_state(state)
    second = draw()
    assert first[:2] == second[:2]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])

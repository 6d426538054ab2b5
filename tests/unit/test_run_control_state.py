"""What the divergence checks remember travels with a checkpoint: a job resumed from a
checkpoint taken while the loss sat at ln V goes on counting --collapse-patience (it used to
start afresh and never stop), and the loss-spike check keeps its running mean."""
import math

import pytest

from megatron_tempnet.training.checkpoint_config import CheckpointConfig
from megatron_tempnet.training.checkpointing import Checkpointer, LoadPlan
from megatron_tempnet.training.loop import TrainLoop
from megatron_tempnet.training.run_control import RunControl, TrainingDiverged

LN_V = math.log(100)


def control() -> RunControl:
    return RunControl(CheckpointConfig(collapse_patience=4, loss_spike_factor=3.0),
                      vocab_size=100)


class Batches:
    """The data iterator's checkpoint interface (its position)."""

    def __init__(self):
        self.consumed = 0

    def state_dict(self):
        return {"consumed_samples": self.consumed}

    def load_state_dict(self, state):
        self.consumed = state["consumed_samples"]


def test_collapse_count_and_spike_mean_survive_a_resume():
    first = control()
    losses = [LN_V, 0.5 * LN_V, 0.5 * LN_V, LN_V, LN_V]  # learned, then at ln V since 4
    for it, loss in enumerate(losses, 1):
        first._check_collapse(it, loss)
        first._check_spike(it, loss)
    loop = TrainLoop(step=None, batches=Batches(), train_cfg=None, ctx=None, control=first)
    loop.state.iteration, loop.batches.consumed = 5, 40
    saved = loop.state_dict()
    assert saved["run_control"] == {"mean_loss": pytest.approx(first._mean_loss), "seen": 5,
                                    "best_loss": 0.5 * LN_V, "uniform_since": 4}

    # a resumed job's loop (a fresh run control) takes it back with the iteration and position
    resumed = TrainLoop(step=None, batches=Batches(), train_cfg=None, ctx=None,
                        control=control())
    resumed.load_state_dict(saved)
    assert (resumed.state.iteration, resumed.batches.consumed) == (5, 40)
    resumed.control._check_collapse(6, LN_V)
    with pytest.raises(TrainingDiverged, match="since iteration 4") as e:
        resumed.control._check_collapse(7, LN_V)  # 4 iterations at ln V: 4, 5 | 6, 7
    assert e.value.since == 4
    assert resumed.control._mean_loss == first._mean_loss and resumed.control._seen == 5

    # a checkpoint from before this was saved (no "run_control"): the checks start afresh
    fresh = TrainLoop(step=None, batches=Batches(), train_cfg=None, ctx=None, control=control())
    fresh.load_state_dict({"iteration": 5, "consumed_samples": 40})
    assert fresh.control.state_dict() == control().state_dict()


def test_finish_load_returns_the_saved_run_control_on_resume_only():
    ck = Checkpointer.__new__(Checkpointer)
    ck.scheduler, ck.ctx, ck.log = None, type("Ctx", (), {"rank": 1})(), print
    state = {"mean_loss": 2.0, "seen": 3, "best_loss": 1.5, "uniform_since": None}
    saved = {"iteration": 7, "consumed_samples": 56, "run_control": state}
    plan = LoadPlan(path=None, saved=saved, resume=True, load_optim=False, load_rng=False)
    assert ck.finish_load(plan, None, None, "model weights") == saved
    plan.resume = False  # --finetune: a fresh start
    assert "run_control" not in ck.finish_load(plan, None, None, "model weights")
    old = {"iteration": 7, "consumed_samples": 56}  # saved before run_control was kept
    plan = LoadPlan(path=None, saved=old, resume=True, load_optim=False, load_rng=False)
    assert ck.finish_load(plan, None, None, "model weights") == old

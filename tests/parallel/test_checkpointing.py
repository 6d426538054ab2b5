"""Checkpoints end to end on 2 processes (one torchrun launch, tests/workers/checkpoint_worker.py):
bitwise resume at TP=2 and PP=2, SIGTERM, NaN guard, a crash during a save, TP=2 -> TP=1,
finetune from a checkpoint without TempNet, shape errors, keep-last, the time-limit exit code."""
import math

import pytest
import torch

from megatron_tempnet.training.run_control import EXIT_CODE_PREEMPTED, EXIT_CODE_TIME_LIMIT
from torchrun import run_torchrun

pytestmark = pytest.mark.parallel


@pytest.fixture(scope="module")
def results(tiny_corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("checkpoints")
    return run_torchrun("checkpoint_worker.py", work, tiny_corpus.data_prefix,
                        tiny_corpus.tokenizer_model, str(work))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bitwise_identical_at_tp2(results):
    for r in results:
        assert [i for i, _ in r["reference"]] == [1, 2, 3, 4, 5, 6]
        assert r["sigterm"] == r["reference"][:3]  # stopped by SIGTERM after iteration 3
        # logged losses, bit for bit
        assert r["resumed_start"] == 3 and r["resumed"] == r["reference"][3:]
        assert same_weights(r["reference_weights"], r["resumed_weights"])


def test_resume_is_bitwise_identical_at_pp2(results):
    for r in results:
        assert r["pp2_start"] == 2
        assert r["pp2_resumed"] == r["pp2_full"][2:]  # last stage logs; first stage logs nothing
        assert same_weights(r["pp2_full_weights"], r["pp2_resumed_weights"])
    assert results[1]["pp2_full"] and not results[0]["pp2_full"]


def test_sigterm_on_one_rank_saves_and_exits_preempted(results):
    for r in results:
        assert r["sigterm_exit"] == EXIT_CODE_PREEMPTED
        assert r["sigterm_latest"] == 3  # and B2 loaded it
        assert r["handler_restored"]


def test_time_limit_saves_and_exits_with_its_code(results):
    for r in results:
        assert r["time_limit_exit"] == EXIT_CODE_TIME_LIMIT and r["time_limit_latest"] == 1


def test_nan_stops_naming_the_iteration_and_keeps_the_last_checkpoint(results):
    for r in results:
        error = r["nan_loss_error"]
        assert error and error.startswith("iteration 7: non-finite"), error
        assert "without saving" in r["nan_loss_error"]
        assert r["nan_loss_latest"] == 6 and r["nan_loss_untouched"] and 7 not in r["nan_loss_dirs"]


def test_crash_during_save_leaves_previous_checkpoint_current(results):
    for r in results:
        assert r["killed_save_error"] == "injected crash during save"
        # an unfinished iter_0000007, not current
        assert r["killed_save_latest"] == 6 and 7 in r["killed_save_dirs"]
        assert r["after_killed_save_start"] == 6 and r["after_killed_save_latest"] == 7
        assert [i for i, _ in r["after_killed_save"]] == [7]


def test_tp2_checkpoint_loads_at_tp1(results):
    a_probe = results[0]["reference_probe"]
    for r in results:
        assert r["tp1_resume_start"] == 6
        for key in ("lm loss", "dro loss"):
            assert math.isclose(r["tp1_resume_probe"][key], a_probe[key], rel_tol=1e-5), key
        more = r["tp1_resume_more"]
        assert [i for i, _ in more] == [7] and math.isfinite(more[0][1])


def test_finetune_loads_lm_weights_and_keeps_tempnet_init(results):
    for r in results:
        assert r["finetune_from_ce_start"] == 0
        assert r["finetune_from_ce_lm_loaded"] and r["finetune_from_ce_tempnet_init"]
        assert [i for i, _ in r["finetune_from_ce_history"]] == [1]


def test_other_model_shape_is_named(results):
    for r in results:
        assert r["other_shape_error"] and "another model shape" in r["other_shape_error"]
        assert "num_layers: checkpoint 4, this run 2" in r["other_shape_error"]


def test_no_load_optim_keeps_position_and_lr_schedule(results):
    for r in results:
        assert r["no_load_optim"] == (7, 7, 0)  # b's latest after after_killed_save: 7


def test_keep_last_deletes_older_checkpoints(results):
    for r in results:
        assert r["reference_dirs"] == [6] and r["reference_latest"] == 6

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
        assert [i for i, _ in r["A"]] == [1, 2, 3, 4, 5, 6]
        assert r["B1"] == r["A"][:3]  # stopped by SIGTERM after iteration 3
        assert r["B2_start"] == 3 and r["B2"] == r["A"][3:]  # logged losses, bit for bit
        assert same_weights(r["A_weights"], r["B2_weights"])


def test_resume_is_bitwise_identical_at_pp2(results):
    for r in results:
        assert r["P_start"] == 2
        assert r["P_resumed"] == r["P_full"][2:]  # last stage logs; first stage logs nothing
        assert same_weights(r["P_full_weights"], r["P_resumed_weights"])
    assert results[1]["P_full"] and not results[0]["P_full"]


def test_sigterm_on_one_rank_saves_and_exits_preempted(results):
    for r in results:
        assert r["B1_exit"] == EXIT_CODE_PREEMPTED
        assert r["B1_latest"] == 3  # and B2 loaded it
        assert r["handler_restored"]


def test_time_limit_saves_and_exits_with_its_code(results):
    for r in results:
        assert r["M_exit"] == EXIT_CODE_TIME_LIMIT and r["M_latest"] == 1


def test_nan_stops_naming_the_iteration_and_keeps_the_last_checkpoint(results):
    for r in results:
        assert r["C_error"] and r["C_error"].startswith("iteration 7: non-finite"), r["C_error"]
        assert "without saving" in r["C_error"]
        assert r["C_latest"] == 6 and r["C_untouched"] and 7 not in r["C_dirs"]


def test_crash_during_save_leaves_previous_checkpoint_current(results):
    for r in results:
        assert r["D_error"] == "injected crash during save"
        assert r["D_latest"] == 6 and 7 in r["D_dirs"]  # unfinished iter_0000007, not current
        assert r["E_start"] == 6 and [i for i, _ in r["E"]] == [7] and r["E_latest"] == 7


def test_tp2_checkpoint_loads_at_tp1(results):
    a_probe = results[0]["A_probe"]
    for r in results:
        assert r["G_start"] == 6
        for key in ("lm loss", "dro loss"):
            assert math.isclose(r["G_probe"][key], a_probe[key], rel_tol=1e-5), key
        assert [i for i, _ in r["G_more"]] == [7] and math.isfinite(r["G_more"][0][1])


def test_finetune_loads_lm_weights_and_keeps_tempnet_init(results):
    for r in results:
        assert r["H_start"] == 0
        assert r["H_lm_loaded"] and r["H_tempnet_init"]
        assert [i for i, _ in r["H_history"]] == [1]


def test_other_model_shape_is_named(results):
    for r in results:
        assert r["F_error"] and "another model shape" in r["F_error"]
        assert "num_layers: checkpoint 4, this run 2" in r["F_error"]


def test_no_load_optim_keeps_position_and_lr_schedule(results):
    for r in results:
        assert r["N"] == (7, 7, 0)  # B's latest after E: 7


def test_keep_last_deletes_older_checkpoints(results):
    for r in results:
        assert r["A_dirs"] == [6] and r["A_latest"] == 6

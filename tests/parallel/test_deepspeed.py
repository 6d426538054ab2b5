"""DeepSpeed ZeRO-1/2 (training/deepspeed.py) trains like the megatron-core DDP path, and
checkpoints in DeepSpeed's format with the protocol of training/checkpointing.py.

Parity launch (2 processes, tests/workers/deepspeed_worker.py): tiny-llama with TempNet
(loss mode tempnet_dro) for 4 steps at DP=2 with ZeRO-1 and ZeRO-2, and at TP=2 with ZeRO-1
(DeepSpeed reads the tensor-parallel groups through the mpu adapter). Both paths start from the
same weights, see the same global batches (random loss masks: the ranks hold different token
counts) and use the same AdamW math, parameter groups (LM decay / no decay / TempNet with its
constant lr), lr schedule (1 warmup step, cosine) and gradient clipping (active: grad norm ~5,
clip 1). Per step, every reported metric and the grad norm must agree within fp32 reduction
round-off; so must the final weights.

Checkpoint launch (``deepspeed_worker.py checkpoint``, through train.build with --deepspeed,
DP=2, TempNet and dropout on): 4 iterations == 2 + SIGTERM (save, exit code 3) + resume + 2,
bitwise in losses and final weights, with ZeRO-1 and ZeRO-2; keep-last, --no-load-optim,
--finetune, the shape error. Unit tests: each format refuses the other's checkpoint by name.

DeepSpeed's CPU accelerator would JIT-build a shared-memory all-reduce op on first use (~45 s);
build_deepspeed_engine disables it, and the optimizer is torch AdamW (no FusedAdam build).
"""
from pathlib import Path

import pytest
import torch

from megatron_tempnet.config import ConfigError, TrainConfig
from megatron_tempnet.training.checkpoint_layout import resolve_load_dir, write_latest
from megatron_tempnet.training.config import DeepSpeedConfig
from megatron_tempnet.training.deepspeed import (deepspeed_available, read_client_state,
                                                 resolve_deepspeed_config)
from megatron_tempnet.training.run_control import EXIT_CODE_PREEMPTED
from torchrun import REPO, run_torchrun

needs_deepspeed = pytest.mark.skipif(
    not deepspeed_available(), reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install "
                                      "deepspeed)")

METRIC_RTOL, METRIC_ATOL = 2e-5, 1e-6  # fp32; reductions reorder sums (seen: ~2e-7 relative)
WEIGHT_ATOL = 1e-5  # after 4 AdamW steps of size <= lr = 2e-3 (seen: < 1e-6)
ZERO1, ZERO2 = (REPO / "configs" / "deepspeed" / f"zero{s}.json" for s in (1, 2))


@pytest.mark.parallel
@needs_deepspeed
def test_deepspeed_zero_matches_megatron_ddp(tmp_path):
    ranks = run_torchrun("deepspeed_worker.py", tmp_path, timeout=240)
    for layout in ranks[0]:
        tp, stage = layout
        for r in ranks:
            res = r[layout]
            where = f"TP={tp} DP={2 // tp} ZeRO-{stage} (rank tp{res['tp_rank']} dp{res['dp_rank']})"
            assert res["ds_stage"] == stage, where
            assert res["num_groups"] == 3, where  # LM decay, LM no decay, TempNet
            assert len(res["deepspeed"]) == len(res["mcore"]) == 4
            for step, (mc, ds) in enumerate(zip(res["mcore"], res["deepspeed"]), 1):
                assert set(mc) == set(ds), where
                assert sorted(mc.pop("lr")) == sorted(ds.pop("lr")), (where, step)
                for key in mc:
                    torch.testing.assert_close(ds[key], mc[key], rtol=METRIC_RTOL,
                                               atol=METRIC_ATOL, msg=f"{where} step {step}: {key}")
                assert mc["grad norm"] > 1.0, "clipping should be active in this test"
            assert res["moved"] > 1e-3, where  # training changed the weights ...
            assert res["weight_diff"] < WEIGHT_ATOL, (where, res["weight_diff"])  # ... alike


@pytest.fixture(scope="module")
def checkpoints(tiny_corpus, tmp_path_factory):
    if not deepspeed_available():
        pytest.skip("deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    work = tmp_path_factory.mktemp("deepspeed_checkpoints")
    return run_torchrun("deepspeed_worker.py", work, "checkpoint", tiny_corpus.data_prefix,
                        tiny_corpus.tokenizer_model, str(work), timeout=240)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parallel
def test_deepspeed_resume_is_bitwise_identical(checkpoints):
    for r in checkpoints:
        # ZeRO-1: A (4 iterations) == B1 (2, stopped by SIGTERM) + B2 (resumed, 2 more)
        assert [i for i, _ in r["A"]] == [1, 2, 3, 4]
        assert r["B1"] == r["A"][:2]
        assert r["B2_start"] == 2 and r["B2_consumed"] == 2 * 8  # iterations x global batch
        assert r["B2"] == r["A"][2:]  # logged losses, bit for bit
        assert same_weights(r["A_weights"], r["B2_weights"])
        # ZeRO-2, resumed from the iter_* directory itself
        assert r["Z_start"] == 2 and r["Z_resumed"] == r["Z_full"][2:]
        assert same_weights(r["Z_full_weights"], r["Z_resumed_weights"])
    assert checkpoints[0]["A"] == checkpoints[1]["A"]  # every rank logs the DP-reduced loss


@pytest.mark.parallel
def test_deepspeed_sigterm_on_one_rank_saves_and_exits_preempted(checkpoints):
    for r in checkpoints:
        assert r["B1_exit"] == EXIT_CODE_PREEMPTED
        assert r["B1_latest"] == 2  # and B2 loaded it


@pytest.mark.parallel
def test_deepspeed_checkpoint_layout_and_keep_last(checkpoints):
    for r in checkpoints:
        assert r["A_dirs"] == [4] and r["A_latest"] == 4
        assert r["A_files"] == ["checksums.json",  # every file's checksum (integrity.py)
                                "mp_rank_00_model_states.pt",  # one TP rank: module + client
                                "writer.json",  # the run lineage that wrote it (save_dir.py)
                                "zero_pp_rank_0_mp_rank_00_optim_states.pt",  # ZeRO partition
                                "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # per DP rank
        assert not r["A_ds_latest"]  # our marker only: DeepSpeed's 'latest' is not written


@pytest.mark.parallel
def test_deepspeed_no_load_optim_keeps_position_and_lr_schedule(checkpoints):
    for r in checkpoints:
        assert r["N"] == (4, 4, 0)  # iteration, scheduler steps, Adam states (none yet)


@pytest.mark.parallel
def test_deepspeed_finetune_loads_the_lm_weights_only(checkpoints):
    for r in checkpoints:
        assert r["H_start"] == 0
        lm = {n: w for n, w in r["A_weights"].items() if not n.startswith("tempnet.")}
        assert len(lm) < len(r["A_weights"])  # A has TempNet, the plain-CE model has not
        assert same_weights(r["H_weights"], lm)
        assert r["H_fp32_synced"]  # ZeRO's master copy holds the loaded weights too


@pytest.mark.parallel
def test_deepspeed_other_model_shape_is_named(checkpoints):
    for r in checkpoints:
        assert r["F_error"] and "another model shape" in r["F_error"]
        assert "num_layers: checkpoint 4, this run 2" in r["F_error"]


@pytest.mark.parallel
def test_deepspeed_checkpoints_evaluate_convert_and_export(checkpoints, single_process, tmp_path,
                                                            capsys):
    """A DeepSpeed checkpoint is evaluated as it is (its TP), converted to a megatron-core one
    (any layout; weights only) and exported to Hugging Face (TP=2: one process per TP rank)."""
    from test_hf_convert import LOSS_RTOL, hf_losses
    from transformers import AutoModelForCausalLM
    from workers.hf_export_worker import probe_batch

    from megatron_tempnet import evaluate
    from megatron_tempnet.hf.convert import checkpoint_to_hf, load_checkpoint_full
    from megatron_tempnet.training.checkpoint_config import CheckpointConfig
    from megatron_tempnet.training.checkpointing import Checkpointer
    from megatron_tempnet.training.run_record import run_record
    from megatron_tempnet.training.stage import build_stage

    r = checkpoints[0]
    work = Path(r["work"])
    a, t = str(work / "a"), str(work / "t")
    # evaluation loads A (ZeRO-1, TP=1, saved at DP=2) in one process: no model flags needed
    run, *_ = evaluate.parse(["--load", a])
    chunks = build_stage(run, single_process)
    logs = []
    assert evaluate.load_model_weights(chunks, run, single_process, logs.append) == 4
    assert same_weights(dict(chunks[0].named_parameters()), r["A_weights"])
    assert any("loaded model weights" in line for line in logs)
    # T was saved at TP=2: DeepSpeed does not reshard, the error names the converter
    run, *_ = evaluate.parse(["--load", t])
    with pytest.raises(ConfigError, match=r"saved at --tensor-model-parallel-size 2.*"
                                          r"convert_deepspeed_checkpoint.py --load"):
        evaluate.load_model_weights(build_stage(run, single_process), run, single_process,
                                    logs.append)

    # the converter: A -> megatron-core, the same weights; it reports what it wrote
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_deepspeed_checkpoint", REPO / "tools" / "convert_deepspeed_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    convert_main = tool.main
    assert convert_main(["--load", a, "--save", str(tmp_path / "a_mc")]) == 0
    said = capsys.readouterr().out
    assert "wrote" in said and "iteration 4" in said and "TempNet loss mode tempnet_dro" in said
    full, _, tcfg = load_checkpoint_full(str(tmp_path / "a_mc"))
    assert tcfg.loss_mode == "tempnet_dro"
    assert same_weights({k: full[k] for k in r["A_weights"]}, r["A_weights"])
    assert convert_main(["--load", a, "--save", str(tmp_path / "a_mc")]) == 2  # not overwritten
    assert "already holds a checkpoint" in capsys.readouterr().err
    # a resume of the weights-only checkpoint must say what it lacks
    run, *_ = evaluate.parse(["--load", str(tmp_path / "a_mc")])
    resume = Checkpointer(CheckpointConfig(load=str(tmp_path / "a_mc")).validate(),
                          build_stage(run, single_process), None, None, single_process,
                          run_record(run.model, run.tempnet, run.train, single_process))
    with pytest.raises(ConfigError, match="holds model weights only .*DeepSpeed.*--finetune"):
        resume.plan_load(lambda p: __import__("megatron.core.dist_checkpointing",
                                              fromlist=["x"]).load_common_state_dict(str(p)))

    # T (TP=2) -> Hugging Face: the losses training measured on the probe batch
    out = checkpoint_to_hf(t, str(tmp_path / "hf_t"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    plain, tempered = hf_losses(model, probe_batch())
    for rank in checkpoints:
        assert plain == pytest.approx(rank["T_probe"]["lm loss"], rel=LOSS_RTOL)
        assert tempered == pytest.approx(rank["T_probe"]["tempered ce"], rel=LOSS_RTOL)
    assert not list(tmp_path.glob("deepspeed-to-torch-dist-*"))  # the scratch copy is gone


def _fake_checkpoint(root, iteration, complete_file):
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / complete_file).write_bytes(b"")
    write_latest(root, iteration)
    return path


def test_each_checkpoint_format_refuses_the_other_by_name(tmp_path):
    ds = _fake_checkpoint(tmp_path / "ds", 3, "mp_rank_00_model_states.pt")
    assert resolve_load_dir(str(tmp_path / "ds"), None, "deepspeed") == ds
    assert resolve_load_dir(str(ds), None, "deepspeed") == ds  # one tag directory itself
    for load in (tmp_path / "ds", ds):
        with pytest.raises(ConfigError, match=r"is a DeepSpeed checkpoint, not a megatron-core "
                                              r"dist_checkpointing checkpoint: load it with "
                                              r"--deepspeed"):
            resolve_load_dir(str(load), None)
    mc = _fake_checkpoint(tmp_path / "mc", 5, "metadata.json")
    with pytest.raises(ConfigError, match="is a megatron-core dist_checkpointing checkpoint, not "
                                          "a DeepSpeed checkpoint: load it without --deepspeed"):
        resolve_load_dir(str(tmp_path / "mc"), None, "deepspeed")
    # no checkpoint yet in its own --save directory: a fresh start, as without DeepSpeed
    assert resolve_load_dir(str(tmp_path / "new"), str(tmp_path / "new"), "deepspeed") is None
    with pytest.raises(ConfigError, match="says 5 but .* is missing or incomplete"):
        (mc / "metadata.json").unlink()
        resolve_load_dir(str(tmp_path / "mc"), None, "deepspeed")


def test_deepspeed_checkpoint_of_another_program_is_named(tmp_path):
    torch.save({"module": {}, "global_steps": 7}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match="no run record in its client state"):
        read_client_state(tmp_path)


def _train(**kw):
    return TrainConfig(**{"micro_batch_size": 2, "global_batch_size": 16, **kw})


def test_deepspeed_json_auto_values_come_from_the_flags():
    ds = resolve_deepspeed_config(ZERO2, _train(precision="bf16", clip_grad=0.5), dp_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2
    assert resolve_deepspeed_config(ZERO1, _train(), 1)["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("override, match", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu = 4 disagrees "
                                            "with --micro-batch-size"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps = 2 disagrees"),
    ({"train_batch_size": 32}, "train_batch_size = 32 disagrees with --global-batch-size"),
    ({"bf16": {"enabled": True}}, "bf16.enabled = True disagrees with --precision"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage = 3"),
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
])
def test_deepspeed_json_mismatch_is_an_error(override, match):
    ds = {"train_micro_batch_size_per_gpu": "auto", **override}
    with pytest.raises(ConfigError, match=match):
        resolve_deepspeed_config(ds, _train(), dp_size=2)


def test_deepspeed_flags_validate(tmp_path):
    assert DeepSpeedConfig().validate() == DeepSpeedConfig()
    DeepSpeedConfig(True, str(ZERO1)).validate()
    with pytest.raises(ConfigError, match="--deepspeed needs --deepspeed_config"):
        DeepSpeedConfig(True, None).validate()
    with pytest.raises(ConfigError, match="without --deepspeed"):
        DeepSpeedConfig(False, str(ZERO1)).validate()
    with pytest.raises(ConfigError, match="no such file"):
        DeepSpeedConfig(True, str(tmp_path / "missing.json")).validate()


def test_deepspeed_refuses_pipeline_parallelism():
    from megatron_tempnet.parallel.runtime import ParallelContext
    from megatron_tempnet.training.deepspeed import MegatronMPU

    ctx = ParallelContext(tp_size=1, pp_size=2, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                          tp_group=None, pp_group=None, dp_group=None,
                          device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 1 only"):
        MegatronMPU(ctx)

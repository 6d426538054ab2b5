"""DeepSpeed ZeRO-1/2 (training/deepspeed.py) trains like the megatron-core DDP path.

One torchrun launch (2 processes, tests/workers/deepspeed_worker.py): tiny-llama with TempNet
(loss mode tempnet_dro) for 4 steps at DP=2 with ZeRO-1 and ZeRO-2, and at TP=2 with ZeRO-1
(DeepSpeed reads the tensor-parallel groups through the mpu adapter). Both paths start from the
same weights, see the same global batches (random loss masks: the ranks hold different token
counts) and use the same AdamW math, parameter groups (LM decay / no decay / TempNet with its
constant lr), lr schedule (1 warmup step, cosine) and gradient clipping (active: grad norm ~5,
clip 1). Per step, every reported metric and the grad norm must agree within fp32 reduction
round-off; so must the final weights.

DeepSpeed's CPU accelerator would JIT-build a shared-memory all-reduce op on first use (~45 s);
build_deepspeed_engine disables it, and the optimizer is torch AdamW (no FusedAdam build).
"""
import pytest
import torch

from megatron_tempnet.config import ConfigError, TrainConfig
from megatron_tempnet.training.deepspeed import (DeepSpeedConfig, deepspeed_available,
                                                 resolve_deepspeed_config)
from torchrun import REPO, run_torchrun

METRIC_RTOL, METRIC_ATOL = 2e-5, 1e-6  # fp32; reductions reorder sums (seen: ~2e-7 relative)
WEIGHT_ATOL = 1e-5  # after 4 AdamW steps of size <= lr = 2e-3 (seen: < 1e-6)
ZERO1, ZERO2 = (REPO / "configs" / "deepspeed" / f"zero{s}.json" for s in (1, 2))


@pytest.mark.parallel
@pytest.mark.skipif(not deepspeed_available(),
                    reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
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

"""Sequence parallelism, activation recomputation, the interleaved pipeline and the data-parallel
overlap options on 2 processes (one torchrun launch, tests/workers/scale_worker.py), each against
the same run without it: same losses and gradients (dropout off; float32 on the CPU, so the
reduction order is the only difference: rtol 1e-5 on losses, 1e-4 relative to each tensor's
largest gradient)."""
import subprocess
import sys

import pytest
import torch

from torchrun import REPO, run_torchrun

pytestmark = pytest.mark.parallel

VARIANTS = ["sp", "selective", "full", "block", "sp_full"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("scale")


@pytest.fixture(scope="module")
def results(tiny_corpus, work):
    return run_torchrun("scale_worker.py", work, tiny_corpus.data_prefix,
                        tiny_corpus.tokenizer_model, str(work), timeout=900)


def assert_same_grads(ref: dict, got: dict, where: str) -> None:
    assert ref.keys() == got.keys(), (where, sorted(ref.keys() ^ got.keys()))
    for name, g in ref.items():
        scale = g.abs().max().clamp(min=1e-12)
        err = (got[name] - g).abs().max() / scale
        assert err < 1e-4, f"{where}: {name} differs by {err:.2e} of its largest gradient"


@pytest.mark.parametrize("case", ["tiny-gpt/reference", "tiny-llama/reference",
                                  "tiny-gpt/fused_linear", "tiny-llama/fused_linear"])
def test_sequence_parallel_and_recompute_match_the_plain_run(results, case):
    for rank, r in enumerate(results):
        runs = r[case]
        loss, dro, ref = runs["base"]
        assert ref and loss is not None and dro is not None
        for variant in [v for v in VARIANTS if v in runs]:
            v_loss, v_dro, got = runs[variant]
            where = f"{case} {variant} rank {rank}"
            assert v_loss == pytest.approx(loss, rel=1e-5), where
            assert v_dro == pytest.approx(dro, rel=1e-5), where
            assert_same_grads(ref, got, where)
    assert set(results[0]["tiny-llama/reference"]) == {"base", *VARIANTS}


def same_history(a: list, b: list, where: str) -> None:
    assert [i for i, *_ in a] == [i for i, *_ in b], where
    for x, y in zip(a, b):
        assert x[1:] == pytest.approx(y[1:], rel=1e-5), (where, x, y)


def test_pipeline_layouts_and_overlap_match_data_parallel(results):
    last = results[-1]  # the last pipeline stage logs (rank 1 for PP=2; every rank for DP=2)
    assert len(last["dp"]) == 3
    for name in ("pp", "vp", "overlap"):
        same_history(last["dp"], last[name], name)


def test_interleaved_run_resumes_bitwise(results):
    last = results[-1]
    assert last["vp_saved"] == last["vp"]  # checkpointing changes nothing
    assert last["vp_resumed"] == last["vp"][2:]  # saved at 2, resumed to 3


def test_overlapped_run_saves_and_resumes_its_weights(results):
    """--overlap-param-gather leaves the weights of a step to the next forward pass: the save
    gathers them first (training.ddp.params_synced), so the resumed run goes on from the right
    weights. Compared to rtol 1e-5, not bitwise: the overlapped reductions are asynchronous."""
    last = results[-1]
    same_history(last["overlap"], last["overlap_saved"], "saved")
    same_history(last["overlap"][2:], last["overlap_resumed"], "resumed")


def test_interleaved_checkpoint_exports_the_same_model(results, work, tiny_corpus):
    """The Hugging Face export of the PP=2 x VP=2 checkpoint (chunks model0, model1) holds the
    weights of the PP=2 run's at the same iteration (same start, same data: rtol 1e-4)."""
    from safetensors.torch import load_file

    tensors, procs = {}, {}
    for name in ("pp", "vp"):  # both exports at once: each a one-core process, mostly imports
        procs[name] = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "convert_checkpoint_to_hf.py"), "--load",
             str(work / name / "iter_0000002"), "--output", str(work / f"hf-{name}"),
             "--tokenizer-model", tiny_corpus.tokenizer_model],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]
        tensors[name] = {k: v for f in sorted((work / f"hf-{name}").glob("*.safetensors"))
                         for k, v in load_file(f).items()}
    assert tensors["pp"].keys() == tensors["vp"].keys() and tensors["pp"]
    for key, ref in tensors["pp"].items():
        torch.testing.assert_close(tensors["vp"][key], ref, rtol=1e-4, atol=1e-6, msg=key)


def test_a_checkpoint_keeps_its_vocabulary_padding_at_another_tp(results):
    """Saved at TP=2 (600 padded rows), resumed and evaluated at TP=1 (which would pad to 500):
    the checkpoint's padding is kept, the resumed losses are the TP=2 run's."""
    last = results[-1]
    same_history(last["pad_saved"][2:], last["pad_resumed_tp1"], "resumed at TP=1")
    assert last["pad_eval_tp1"]["eval tokens"] > 0

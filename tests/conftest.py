import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Without a GPU the Triton kernels (tempnet/triton_kernels.py) run under Triton's interpreter;
# it must be on before the kernels are first imported (torchrun workers inherit it).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "parallel: launches torchrun with 2 processes")
    config.addinivalue_line("markers", "slow: longer end-to-end test")
    config.addinivalue_line("markers", "triton: needs Triton (the [dev] extra installs it)")
    config.addinivalue_line("markers", "slurm: starts a real single-host SLURM (root, slurm-wlm, "
                                       "munge: .ci/install_slurm.sh); skipped with the reason "
                                       "where it cannot")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import torch

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs CUDA")
    if importlib.util.find_spec("triton") is None:
        skips["triton"] = pytest.mark.skip(reason="needs triton (the [dev] extra installs it)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh random seed per test, printed; TEMPNET_TEST_SEED=<value> replays a failure."""
    import random

    value = int(os.environ.get("TEMPNET_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"TEMPNET_TEST_SEED={value}")
    return value


@pytest.fixture(scope="session")
def single_process():
    """A one-process (TP=1, PP=1) megatron-core runtime for in-process reference models."""
    from torchrun import free_port

    from megatron_tempnet.parallel import initialize

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return initialize(tp=1, pp=1, seed=1234, environ=env)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small demo corpus, SentencePiece tokenizer and .bin/.idx dataset, built once per
    session (tests/corpus.py); ``.data_flags()`` gives the training flags that read it."""
    from corpus import build_tiny_corpus

    return build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))

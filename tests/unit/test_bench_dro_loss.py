"""bench/bench_dro_loss.py runs end to end at a tiny size and reports every implementation:
a time for those that run here, the reason for those that cannot (GPU-only peers)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.triton


def test_bench_dro_loss_smoke(capsys):
    import bench_dro_loss

    rows = bench_dro_loss.main(["--tokens", "8", "--hidden", "8", "--vocab", "37", "--iters",
                                "1", "--warmup", "0", "--tempnet-hidden", "4"])
    out = capsys.readouterr().out
    assert "| implementation | V | fwd+bwd ms | extra peak GiB |" in out
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == set(bench_dro_loss.LABELS.values())
    for impl in ("dense_ce", "dense_dro", "reference", "fused", "fused_linear"):
        row = by_impl[bench_dro_loss.LABELS[impl]]
        assert "error" not in row and math.isfinite(row["ms"]) and row["ms"] > 0, row
    if not torch.cuda.is_available():
        for impl in ("liger", "cce"):  # plain-CE peers: GPU only, named as such
            assert by_impl[bench_dro_loss.LABELS[impl]]["error"] == "GPU only"

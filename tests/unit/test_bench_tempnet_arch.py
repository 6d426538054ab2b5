"""bench/bench_tempnet_arch.py runs and prints its table (a tiny smoke size; the numbers in
docs/tempnet_design.md come from its default size)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_tempnet_arch_smoke():
    out = subprocess.run([sys.executable, "bench/bench_tempnet_arch.py", "--seeds", "1",
                          "--rho", "1", "--vocab", "128", "--steps", "30", "--variants",
                          "paper (dropout 0)", "scale_aware", "scale_aware, linear tau map"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in out.stdout.splitlines()
            if ln.startswith("| ") and "---" not in ln and "variant" not in ln}
    assert set(rows) == {"paper (dropout 0)", "scale_aware", "scale_aware, linear tau map"}
    r2 = {k: float(v.split(" | ")[2].split()[0]) for k, v in rows.items()}
    assert r2["scale_aware"] > 0.5 > r2["paper (dropout 0)"], out.stdout

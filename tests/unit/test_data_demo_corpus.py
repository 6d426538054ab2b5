import json
import subprocess
import sys
from pathlib import Path

from megatron_tempnet.data.demo_corpus import write_demo_corpus

REPO = Path(__file__).resolve().parents[2]


def test_demo_corpus_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    n = write_demo_corpus(str(a), max_bytes=60_000)
    # A fresh interpreter (other hash seed, nothing pre-imported) writes the same bytes.
    subprocess.run([sys.executable, "-m", "megatron_tempnet.data.demo_corpus", "--output",
                    str(b), "--max-bytes", "60000"], check=True, capture_output=True,
                   env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=REPO)
    assert a.read_bytes() == b.read_bytes()
    assert 50_000 < n <= 60_000 and a.stat().st_size == n
    docs = [json.loads(line)["text"] for line in a.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == len(set(docs)) > 50
    assert docs[0].startswith("abc\n\n")


def test_code_corpus_is_deterministic_source(tmp_path):
    import json

    from megatron_tempnet.data.demo_corpus import write_demo_corpus

    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for p in paths:
        write_demo_corpus(str(p), max_bytes=200_000, kind="code")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    docs = [json.loads(ln)["text"] for ln in paths[0].read_text().splitlines()]
    assert len(docs) > 20 and all(d.startswith("# ") for d in docs)
    assert any("\ndef " in d or "\nclass " in d for d in docs)
    import pytest
    with pytest.raises(ValueError, match="unknown corpus kind"):
        write_demo_corpus(str(tmp_path / "c.jsonl"), kind="poems")

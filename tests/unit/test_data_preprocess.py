"""JSONL -> .bin/.idx, read back with megatron-core's own IndexedDataset."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_tempnet.data.indexed import (CorruptDatasetError, IndexedDatasetWriter,
                                           check_indexed_dataset, merge_datasets)
from megatron_tempnet.data.jsonl import InputError
from megatron_tempnet.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from data_helpers import TOKENIZER_KINDS, UNICODE_DOCS, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def run(tmp_path, inputs, tokenizer_config, name="out", **kwargs):
    summary = preprocess(PreprocessConfig([str(i) for i in inputs], str(tmp_path / name),
                                          tokenizer_config, **kwargs))
    return summary, summary.outputs[0]


def read_back(prefix, tokenizer, eod=True) -> list[str]:
    ds = IndexedDataset(prefix)
    texts = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        if eod and ids:
            assert ids[-1] == tokenizer.eod
            ids = ids[:-1]
        texts.append(tokenizer.detokenize(ids))
    return texts


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_roundtrip_through_megatron_indexed_dataset(tmp_path, corpus_file, corpus_docs,
                                                    tokenizer_configs, tokenizers, kind):
    summary, prefix = run(tmp_path, [corpus_file], tokenizer_configs[kind], append_eod=True)
    assert summary.documents == len(corpus_docs)
    assert read_back(prefix, tokenizers[kind]) == corpus_docs
    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.uint16
    assert sum(ds.sequence_lengths) == summary.tokens
    assert list(ds.document_indices) == list(range(len(corpus_docs) + 1))


def test_gzip_directory_and_glob_inputs(tmp_path, corpus_docs, tokenizer_configs, tokenizers):
    src = tmp_path / "src"
    write_jsonl(src / "a.jsonl", corpus_docs[:30])
    (src / "sub").mkdir()
    with gzip.open(src / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in corpus_docs[30:60])
    (src / "notes.txt").write_text("ignored: not jsonl")
    tok = tokenizers["sentencepiece"]
    _, by_dir = run(tmp_path, [src], tokenizer_configs["sentencepiece"], "dir", append_eod=True)
    assert read_back(by_dir, tok) == corpus_docs[:60]
    _, by_glob = run(tmp_path, [src / "sub" / "*.gz"], tokenizer_configs["sentencepiece"],
                     "glob", append_eod=True)
    assert read_back(by_glob, tok) == corpus_docs[30:60]
    with pytest.raises(InputError, match="matches no file"):
        run(tmp_path, [src / "*.parquet"], tokenizer_configs["sentencepiece"])


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_empty_documents_and_unicode(tmp_path, tokenizer_configs, tokenizers, kind):
    docs = ["", *UNICODE_DOCS, "", "   ", "last"]
    path = write_jsonl(tmp_path / "u.jsonl", docs)
    with open(path, "a") as f:
        f.write("\n")  # a blank line is not a document
    summary, prefix = run(tmp_path, [path], tokenizer_configs[kind], append_eod=True)
    assert summary.documents == len(docs)
    assert summary.empty_documents == 2
    ds = IndexedDataset(prefix)
    assert ds[0].size == 0  # empty: no tokens and no eod, as Megatron
    texts = [tokenizers[kind].detokenize(ds[i].tolist()[:-1]) if ds[i].size else ""
             for i in range(len(ds))]
    assert texts == docs


def test_multiple_json_keys(tmp_path, tokenizer_configs, tokenizers):
    path = tmp_path / "kv.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "title": f"title {i}"}) + "\n"
                            for i in range(5)))
    summary = preprocess(PreprocessConfig([str(path)], str(tmp_path / "kv"),
                                          tokenizer_configs["huggingface"],
                                          json_keys=["text", "title"]))
    assert [Path(o).name for o in summary.outputs] == ["kv_text_document", "kv_title_document"]
    tok = tokenizers["huggingface"]
    assert read_back(summary.outputs[1], tok, eod=False) == [f"title {i}" for i in range(5)]


BAD_LINES = [
    (b'{"text": "ok"\n', "malformed JSON"),
    (b'{"body": "no text key"}\n', "missing key 'text'"),
    (b'{"text": 42}\n', "key 'text' holds int, expected a string"),
    (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    (b'["a list"]\n', "expected a JSON object"),
    (b'{"text": "\\ud800"}\n', "key 'text' holds an unpaired surrogate"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_input_fails_with_file_and_line(tmp_path, tokenizer_configs, bad, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "fine too"}\n' + bad + b'{"text": "x"}\n')
    with pytest.raises(PreprocessError) as e:
        run(tmp_path, [path], tokenizer_configs["sentencepiece"], workers=2, chunk_bytes=16)
    assert f"{path}:4: {reason}" in str(e.value)
    assert "--on-error skip" in str(e.value)
    assert not list(tmp_path.glob("out_*")), "a failed run must leave no output or temp files"


def test_bad_input_skip(tmp_path, tokenizer_configs, tokenizers):
    path = tmp_path / "mixed.jsonl.gz"
    lines = [b'{"text": "one"}\n'] + [bad for bad, _ in BAD_LINES] + [b'{"text": "two"}\n']
    with gzip.open(path, "wb") as f:
        f.writelines(lines)
    summary, prefix = run(tmp_path, [path], tokenizer_configs["sentencepiece"], on_error="skip")
    assert summary.skipped == len(BAD_LINES)
    assert summary.skipped_examples[0].startswith(f"{path}:2: malformed JSON")
    assert read_back(prefix, tokenizers["sentencepiece"], eod=False) == ["one", "two"]
    assert "skipped lines: 6" in summary.format()


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_one_and_many_workers_write_identical_bytes(tmp_path, corpus_file, tokenizer_configs,
                                                    kind):
    prefixes = [run(tmp_path, [corpus_file, corpus_file], tokenizer_configs[kind], f"w{w}",
                    workers=w, append_eod=True, chunk_bytes=20_000)[1] for w in (1, 2)]
    for suffix in (".bin", ".idx"):
        a, b = (Path(p + suffix).read_bytes() for p in prefixes)
        assert a == b


def test_interrupted_writer_leaves_no_complete_pair(tmp_path):
    prefix = str(tmp_path / "partial")
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_documents(np.arange(10), np.array([4, 6]))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # A killed run (no cleanup) leaves only temporary names, which readers reject clearly.
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_documents(np.arange(10), np.array([4, 6]))
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    with pytest.raises(CorruptDatasetError, match="did not finish"):
        check_indexed_dataset(prefix)
    writer.finalize()
    assert check_indexed_dataset(prefix).num_documents == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.bin", "partial.idx"]


def test_merge(tmp_path, corpus_docs, tokenizer_configs, tokenizers):
    cfg, tok = tokenizer_configs["huggingface"], tokenizers["huggingface"]
    parts = [corpus_docs[:20], corpus_docs[20:25], corpus_docs[25:60]]
    prefixes = [run(tmp_path, [write_jsonl(tmp_path / f"p{i}.jsonl", docs)], cfg, f"p{i}",
                    append_eod=True)[1] for i, docs in enumerate(parts)]
    merged = str(tmp_path / "merged")
    subprocess.run([sys.executable, str(REPO / "tools" / "merge_datasets.py"), "--input",
                    *prefixes, "--output-prefix", merged], check=True, capture_output=True)
    assert read_back(merged, tok) == corpus_docs[:60]
    ds = IndexedDataset(merged)
    assert list(ds.document_indices) == list(range(61))
    # Same content as preprocessing everything at once.
    _, whole = run(tmp_path, [write_jsonl(tmp_path / "all.jsonl", corpus_docs[:60])], cfg,
                   "whole", append_eod=True)
    for suffix in (".bin", ".idx"):
        assert Path(merged + suffix).read_bytes() == Path(whole + suffix).read_bytes()


def test_merge_multi_sequence_documents_and_dtypes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with IndexedDatasetWriter(a, np.uint16) as w:
        w.add_document([1, 2, 3, 4, 5], sequence_lengths=[2, 3])
        w.add_document([6])
        w.finalize()
    with IndexedDatasetWriter(b, np.int32) as w:
        w.add_document([70000, 7], sequence_lengths=[1, 1])
        w.finalize()
    info = merge_datasets([a, b], str(tmp_path / "ab"))
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert info.dtype == np.int32 and ds.index.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3, 4, 5], [6], [70000], [7]]
    assert list(ds.document_indices) == [0, 2, 3, 5]


def test_corrupt_or_missing_index_gives_clear_error(tmp_path, sp_dataset):
    prefix = str(tmp_path / "copy")
    for suffix in (".bin", ".idx"):
        Path(prefix + suffix).write_bytes(Path(sp_dataset + suffix).read_bytes())
    idx = Path(prefix + ".idx")
    good = idx.read_bytes()
    assert check_indexed_dataset(prefix).num_documents > 0

    idx.write_bytes(good[:-7])
    with pytest.raises(CorruptDatasetError, match=r"copy\.idx: .* bytes, but its header"):
        check_indexed_dataset(prefix)
    idx.write_bytes(b"GARBAGE!!" + good[9:])
    with pytest.raises(CorruptDatasetError, match="bad header .* not a Megatron"):
        check_indexed_dataset(prefix)
    idx.write_bytes(good[:20])
    with pytest.raises(CorruptDatasetError, match="shorter than the 34-byte header"):
        check_indexed_dataset(prefix)
    idx.write_bytes(good)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(CorruptDatasetError, match=r"copy\.bin: .* bytes, but .* describes"):
        check_indexed_dataset(prefix)
    with pytest.raises(CorruptDatasetError, match="missing .*nothere.bin"):
        check_indexed_dataset(str(tmp_path / "nothere"))


def test_cli_reports_bad_line_and_exit_code(tmp_path, tokenizer_configs):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": 1}\n')
    cfg = tokenizer_configs["sentencepiece"]
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(path),
           "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type", "sentencepiece",
           "--tokenizer-model", cfg.model, "--append-eod"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"error: {path}:2: key 'text' holds int" in proc.stderr
    proc = subprocess.run(cmd + ["--on-error", "skip", "--workers", "2", "--log-interval", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "docs/s" in proc.stderr and "MB/s" in proc.stderr and "tokens/s" in proc.stderr
    assert "skipped lines: 1" in proc.stdout

"""Preprocessing throughput: tools/preprocess_data.py against a baseline, same tokenizer.

Corpus: the demo corpus (stdlib docstrings, megatron_tempnet.data.demo_corpus) repeated, each
copy in its own deterministic shuffled order, up to --corpus-mb. Tokenizers: SentencePiece
BPE and byte-level BPE trained on the demo corpus (--vocab-size).

Baseline: Megatron-LM's own tools/preprocess_data.py when --megatron-lm points at a checkout
that runs here (it needs megatron.training, which the megatron-core wheel lacks); otherwise a
single-document-at-a-time baseline (Pool.imap over lines, one tokenize() call per document,
megatron-core's IndexedDatasetBuilder in the main process), labelled as such.

Every run is a fresh process. Start-up (imports, tokenizer loading) is measured on a
one-document input and subtracted from wall and CPU time, so the rates are steady-state
processing rates; each is the best of --repeats runs (min of wall and of CPU time). "MB/CPU-s" (input MB per CPU-second of all processes together) is the
throughput per core.

    python bench/bench_preprocess.py --workers 1 2 --megatron-lm /path/to/Megatron-LM \
        --megatron-pythonpath /path/to/extra/site --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tempnet.data.demo_corpus import iter_demo_documents  # noqa: E402
from megatron_tempnet.data.indexed import check_indexed_dataset  # noqa: E402
from megatron_tempnet.data.tokenizer_training import (TokenizerTrainingConfig,  # noqa: E402
                                                      train_tokenizer)

MEGATRON_TYPES = {"sentencepiece": "GPTSentencePieceTokenizer",
                  "huggingface": "HuggingFaceTokenizer"}


@dataclass
class Run:
    tool: str
    tokenizer: str
    workers: int
    docs: int
    mb: float
    tokens: int
    wall: float
    cpu: float

    def row(self) -> list[str]:
        return [self.tool, self.tokenizer, str(self.workers), f"{self.docs / self.wall:,.0f}",
                f"{self.mb / self.wall:.2f}", f"{self.tokens / self.wall / 1e6:.2f}M",
                f"{self.mb / self.cpu:.2f}"]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall s, CPU s of the process and its reaped children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def best(cmd: list[str], env: dict | None, repeats: int) -> tuple[float, float]:
    """(min wall, min CPU) over ``repeats`` runs."""
    walls, cpus = zip(*(timed(cmd, env) for _ in range(repeats)))
    return min(walls), min(cpus)


def write_corpus(path: Path, mb: float) -> list[str]:
    docs = list(iter_demo_documents())
    rng = random.Random(0)
    size, limit = 0, int(mb * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while size < limit:
            rng.shuffle(docs)
            for doc in docs:
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= limit:
                    break
    return docs


def train_tokenizers(work: Path, corpus: Path, vocab_size: int) -> dict[str, str]:
    sp = train_tokenizer(TokenizerTrainingConfig([str(corpus)], str(work / "sp.model"),
                                                 "sentencepiece-bpe", vocab_size,
                                                 max_documents=20000))
    hf_dir = work / "hf"
    bpe = train_tokenizer(TokenizerTrainingConfig([str(corpus)], str(hf_dir / "tokenizer.json"),
                                                  "byte-level-bpe", vocab_size,
                                                  max_documents=20000))
    # What transformers' AutoTokenizer (Megatron's HuggingFaceTokenizer) needs besides the file.
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    return {"sentencepiece": sp, "huggingface": bpe}


def ours_cmd(inp: Path, out: Path, kind: str, model: str, workers: int) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(inp),
            "--output-prefix", str(out), "--tokenizer-type", kind, "--tokenizer-model", model,
            "--workers", str(workers), "--append-eod", "--log-interval", "0"]


def megatron_cmd(mlm: Path, inp: Path, out: Path, kind: str, model: str, workers: int
                 ) -> list[str]:
    model_arg = str(Path(model).parent) if kind == "huggingface" else model
    return [sys.executable, "-W", "ignore", str(mlm / "tools" / "preprocess_data.py"), "--input",
            str(inp), "--output-prefix", str(out), "--tokenizer-type", MEGATRON_TYPES[kind],
            "--tokenizer-model", model_arg, "--workers", str(workers), "--append-eod",
            "--log-interval", "1000000000"]


def baseline_cmd(inp: Path, out: Path, kind: str, model: str, workers: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--single-doc-baseline", str(inp),
            str(out), kind, model, str(workers)]


def run_single_doc_baseline(inp: str, out: str, kind: str, model: str, workers: int) -> None:
    """One tokenize() per document through Pool.imap, written by megatron-core's builder."""
    import multiprocessing

    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_tempnet.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(kind, model)
    builder = IndexedDatasetBuilder(out + "_text_document.bin",
                                    dtype=DType.optimal_dtype(tokenizer.vocab_size))
    with open(inp, encoding="utf-8") as f, multiprocessing.Pool(
            workers, initializer=_baseline_init, initargs=(kind, model)) as pool:
        for ids in pool.imap(_baseline_encode, f, 32):
            builder.add_document(np.array(ids), [len(ids)] if ids else [])
    builder.finalize(out + "_text_document.idx")


def _baseline_init(kind: str, model: str) -> None:
    from megatron_tempnet.data.tokenizers import load_tokenizer

    global _baseline_tokenizer
    _baseline_tokenizer = load_tokenizer(kind, model)


def _baseline_encode(line: str) -> list[int]:
    ids = _baseline_tokenizer.tokenize(json.loads(line)["text"])
    return ids + [_baseline_tokenizer.eod] if ids else ids


def measure(tool: str, cmd_for, corpus: Path, one_doc: Path, work: Path, kind: str,
            model: str, workers: int, env: dict | None, docs: int, mb: float,
            repeats: int) -> Run:
    """Best of ``repeats`` runs (the sandbox is noisy), start-up subtracted."""
    out = work / f"{tool.split()[0].lower()}-{kind}-{workers}"
    startup = best(cmd_for(one_doc, work / "startup", kind, model, workers), env, repeats)
    total = best(cmd_for(corpus, out, kind, model, workers), env, repeats)
    info = check_indexed_dataset(f"{out}_text_document")
    assert info.num_documents == docs, (tool, info.num_documents, docs)
    tokens = info.bin_bytes // info.dtype.itemsize
    return Run(tool, kind, workers, docs, mb, tokens, max(total[0] - startup[0], 1e-6),
               max(total[1] - startup[1], 1e-6))


def same_output(a: Path, b: Path) -> bool:
    return all(Path(f"{a}_text_document{s}").read_bytes() == Path(f"{b}_text_document{s}")
               .read_bytes() for s in (".bin", ".idx"))


def table(runs: list[Run]) -> str:
    head = ["tool", "tokenizer", "workers", "docs/s", "MB/s", "tokens/s", "MB/CPU-s"]
    rows = [head, ["---"] * len(head)] + [r.row() for r in runs]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def speedups(runs: list[Run], ours: str, base: str) -> list[str]:
    lines = []
    for r in runs:
        if r.tool != ours:
            continue
        for b in runs:
            if b.tool == base and (b.tokenizer, b.workers) == (r.tokenizer, r.workers):
                lines.append(f"- {r.tokenizer}, {r.workers} worker(s): "
                             f"{(r.mb / r.cpu) / (b.mb / b.cpu):.1f}x throughput per core "
                             f"(MB/CPU-s), {(r.mb / r.wall) / (b.mb / b.wall):.1f}x wall-clock")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus-mb", type=float, default=16.0)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement; best kept")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizers", nargs="+", default=list(MEGATRON_TYPES))
    p.add_argument("--megatron-lm", type=Path, default=None,
                   help="a Megatron-LM checkout whose tools/preprocess_data.py runs here")
    p.add_argument("--megatron-pythonpath", default="",
                   help="extra PYTHONPATH entries its imports need (os.pathsep separated)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also write the table as the Preprocessing section of this file")
    p.add_argument("--note", default="", help="a line heading the markdown section (machine...)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--single-doc-baseline", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single_doc_baseline:
        inp, out, kind, model, workers = args.single_doc_baseline
        run_single_doc_baseline(inp, out, kind, model, int(workers))
        return

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, one_doc = work / "corpus.jsonl", work / "one.jsonl"
    write_corpus(corpus, args.corpus_mb)
    with open(corpus, encoding="utf-8") as f:
        lines = f.readlines()
    one_doc.write_text(lines[0], encoding="utf-8")
    docs, mb = len(lines), corpus.stat().st_size / 1e6
    models = train_tokenizers(work, corpus, args.vocab_size)

    if args.megatron_lm:
        base_tool = "Megatron-LM preprocess_data.py"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(args.megatron_lm), args.megatron_pythonpath]))
        base_cmd = lambda *a: megatron_cmd(args.megatron_lm, *a)  # noqa: E731
    else:
        base_tool, env, base_cmd = "single-doc baseline (not Megatron-LM)", None, baseline_cmd
    ours_tool = "megatron-tempnet preprocess_data.py"
    runs, identical = [], []
    for kind in args.tokenizers:
        for w in args.workers:
            for tool, cmd, tool_env in ((base_tool, base_cmd, env), (ours_tool, ours_cmd, None)):
                runs.append(measure(tool, cmd, corpus, one_doc, work, kind, models[kind], w,
                                    tool_env, docs, mb, args.repeats))
                print(table(runs[-1:]).splitlines()[-1], flush=True)
            identical.append(same_output(work / f"{base_tool.split()[0].lower()}-{kind}-{w}",
                                         work / f"{ours_tool.split()[0].lower()}-{kind}-{w}"))

    report = "\n".join([
        *([args.note, ""] if args.note else []),
        f"Corpus: {docs:,} documents, {mb:.1f} MB of JSONL (demo corpus repeated), "
        f"tokenizers trained with vocab {args.vocab_size}; --append-eod.", "",
        table(runs), "", *speedups(runs, ours_tool, base_tool), "",
        f"Output byte-identical to the baseline's .bin/.idx in every run: {all(identical)}"])
    print("\n" + report)
    if args.markdown:
        write_markdown_section(args.markdown, "Preprocessing", report)


def write_markdown_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the "## <title>" section of a markdown file, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(f"\n## {title}\n")
    section = f"\n## {title}\n\n{body}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()

"""JSONL -> Megatron .bin/.idx, streamed through a pool of tokenizer processes.

The input is cut into chunks of whole lines (independent of the worker count); each chunk is
parsed and batch-encoded by a worker and written in input order, so the output bytes do not
depend on ``workers``. At most ``2 * workers`` chunks are in flight, so memory stays bounded
whatever the corpus size. Output names follow Megatron: ``<prefix>_<key>_document.bin/.idx``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from megatron_tempnet.data.indexed import IndexedDatasetWriter
from megatron_tempnet.data.jsonl import (DocumentError, expand_inputs, is_blank, iter_lines,
                                         parse_document)
from megatron_tempnet.data.tokenizers import TokenizerConfig, build_tokenizer, token_dtype

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip")
MAX_LOGGED_SKIPS = 20


class PreprocessError(ValueError):
    """Bad input under --on-error fail; the message names the file and line."""


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]  # .jsonl / .jsonl.gz files, directories or globs
    output_prefix: str
    tokenizer: TokenizerConfig
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    on_error: str = "fail"  # "fail": stop at the first bad line; "skip": drop it and go on
    log_interval: int = 10000  # documents between progress lines
    chunk_bytes: int = 1 << 20  # input bytes per unit of work

    def validate(self) -> "PreprocessConfig":
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"--on-error {self.on_error!r}: choose one of {ON_ERROR_CHOICES}")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: need at least 1")
        if not self.json_keys:
            raise ValueError("--json-keys: give at least one key")
        return self


@dataclass
class Chunk:
    path: str
    first_line: int
    lines: list[bytes]


@dataclass
class ChunkResult:
    path: str
    documents: int
    input_bytes: int
    encoded: list[tuple[np.ndarray, np.ndarray]]  # per json key: (tokens, lengths)
    errors: list[tuple[int, str]]  # (line number, reason)


@dataclass
class PreprocessSummary:
    files: list[str]
    outputs: list[str]
    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped: int = 0  # bad lines dropped under --on-error skip
    skipped_examples: list[str] = field(default_factory=list)  # the first few "file:line: why"
    seconds: float = 0.0

    def rates(self) -> tuple[float, float, float]:
        """(docs/s, MB/s, tokens/s) so far."""
        s = max(self.seconds, 1e-9)
        return self.documents / s, self.input_bytes / s / 1e6, self.tokens / s

    def progress_line(self) -> str:
        docs, mb, toks = self.rates()
        return (f"processed {self.documents} docs, {self.input_bytes / 1e6:.1f} MB, "
                f"{self.tokens} tokens | {docs:.0f} docs/s, {mb:.2f} MB/s, {toks:.0f} tokens/s"
                + (f" | skipped {self.skipped}" if self.skipped else ""))

    def format(self) -> str:
        lines = [f"done in {self.seconds:.2f} s: {len(self.files)} input file(s)",
                 self.progress_line(),
                 f"empty documents: {self.empty_documents}, skipped lines: {self.skipped}"]
        lines += [f"  skipped {s}" for s in self.skipped_examples]
        lines += [f"output: {o}.bin/.idx" for o in self.outputs]
        return "\n".join(lines)


class ChunkEncoder:
    """Parses and tokenizes chunks; one per worker process."""

    def __init__(self, tokenizer_config: TokenizerConfig, json_keys: Sequence[str],
                 append_eod: bool):
        # One core per worker: no hidden Rust thread pool inside Hugging Face tokenizers.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = build_tokenizer(tokenizer_config)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.json_keys = tuple(json_keys)
        self.append_eod = append_eod

    def __call__(self, chunk: Chunk) -> ChunkResult:
        texts: list[list[str]] = [[] for _ in self.json_keys]
        errors = []
        for i, line in enumerate(chunk.lines):
            if is_blank(line):
                continue
            try:
                values = parse_document(line, self.json_keys)
            except DocumentError as e:
                errors.append((chunk.first_line + i, str(e)))
                continue
            for column, value in zip(texts, values):
                column.append(value)
        encoded = [self.tokenizer.encode_documents(column, self.dtype, self.append_eod)
                   for column in texts]
        return ChunkResult(chunk.path, len(texts[0]), sum(map(len, chunk.lines)), encoded,
                           errors)


def read_chunks(files: Iterable[str], chunk_bytes: int) -> Iterator[Chunk]:
    """Whole lines, about ``chunk_bytes`` at a time; a chunk never spans two files."""
    for path in files:
        lines: list[bytes] = []
        size = 0
        first = 1
        for line_no, line in iter_lines(path):
            lines.append(line)
            size += len(line)
            if size >= chunk_bytes:
                yield Chunk(path, first, lines)
                lines, size, first = [], 0, line_no + 1
        if lines:
            yield Chunk(path, first, lines)


# The encoder of a pool worker process, created once by its initializer.
_worker_encoder: ChunkEncoder | None = None


def _init_worker(*args) -> None:
    global _worker_encoder
    _worker_encoder = ChunkEncoder(*args)


def _encode_in_worker(chunk: Chunk) -> ChunkResult:
    return _worker_encoder(chunk)


def encode_in_order(chunks: Iterable[Chunk], encoder_args: tuple, workers: int
                    ) -> Iterator[ChunkResult]:
    """Encode chunks, yielding results in input order with a bounded number in flight."""
    if workers == 1:
        encoder = ChunkEncoder(*encoder_args)
        yield from map(encoder, chunks)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=encoder_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def output_prefixes(output_prefix: str, json_keys: Sequence[str]) -> list[str]:
    return [f"{output_prefix}_{key}_document" for key in json_keys]


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize the inputs into one .bin/.idx pair per json key; returns the run's summary."""
    config.validate()
    files = expand_inputs(config.inputs)
    tokenizer = build_tokenizer(config.tokenizer)  # fail fast, before any worker starts
    dtype = token_dtype(tokenizer.vocab_size)
    summary = PreprocessSummary(files, output_prefixes(config.output_prefix, config.json_keys))
    encoder_args = (config.tokenizer, tuple(config.json_keys), config.append_eod)
    start = time.perf_counter()
    next_log = config.log_interval
    with ExitStack() as stack:
        writers = [stack.enter_context(IndexedDatasetWriter(prefix, dtype))
                   for prefix in summary.outputs]
        results = stack.enter_context(closing(encode_in_order(
            read_chunks(files, config.chunk_bytes), encoder_args, config.workers)))
        for result in results:  # an error stops the workers (closing) and drops the outputs
            _record_errors(result, config.on_error, summary)
            for writer, (tokens, lengths) in zip(writers, result.encoded):
                writer.add_documents(tokens, lengths)
            summary.documents += result.documents
            summary.empty_documents += int((result.encoded[0][1] == 0).sum())
            summary.tokens += sum(len(tokens) for tokens, _ in result.encoded)
            summary.input_bytes += result.input_bytes
            summary.seconds = time.perf_counter() - start
            if config.log_interval and summary.documents >= next_log:
                logger.info(summary.progress_line())
                next_log = (summary.documents // config.log_interval + 1) * config.log_interval
        for writer in writers:
            writer.finalize()
    summary.seconds = time.perf_counter() - start
    return summary


def _record_errors(result: ChunkResult, on_error: str, summary: PreprocessSummary) -> None:
    for line_no, reason in result.errors:
        where = f"{result.path}:{line_no}: {reason}"
        if on_error == "fail":
            raise PreprocessError(f"{where}. Fix the line, or pass --on-error skip to drop bad "
                                  f"lines; no output was written")
        if summary.skipped < MAX_LOGGED_SKIPS:
            logger.warning("skipping %s", where)
            summary.skipped_examples.append(where)
        summary.skipped += 1

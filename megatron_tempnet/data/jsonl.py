"""JSONL inputs: expanding files/directories/globs, streaming lines, parsing documents.

Lines are read as bytes and decoded per document so that a bad line is reported with its file
and line number instead of aborting a whole file.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
GZIP_MAGIC = b"\x1f\x8b"


class InputError(ValueError):
    """An input path that matches nothing or cannot be read."""


class DocumentError(ValueError):
    """One bad input line; ``str()`` is the reason, the caller adds file and line number."""


def expand_inputs(inputs: Sequence[str], suffixes: Sequence[str] = JSONL_SUFFIXES) -> list[str]:
    """Files, directories (searched recursively for files ending in ``suffixes``) and globs.

    Order is deterministic: each argument expands to its sorted matches, arguments keep their
    order, and a file named twice is read once.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            matches = sorted(str(p) for p in Path(item).rglob("*")
                             if p.is_file() and p.name.endswith(tuple(suffixes)))
            if not matches:
                raise InputError(f"input directory {item!r} holds no {'/'.join(suffixes)} files")
        elif os.path.isfile(item):
            matches = [item]
        else:
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"input {item!r} matches no file (not a file, directory or "
                                 f"glob with matches)")
        files.extend(matches)
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def open_binary(path: str):
    """The file as a binary stream; gzip (by magic bytes) is decompressed on the fly."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every line of a (possibly gzipped) file."""
    try:
        with open_binary(path) as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read ({e})") from e


def is_blank(line: bytes) -> bool:
    return not line.strip()


def parse_document(line: bytes, keys: Sequence[str]) -> list[str]:
    """The text under each key of one JSON line; raises DocumentError naming the problem."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"invalid UTF-8 at byte {e.start} ({e.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DocumentError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DocumentError(f"expected a JSON object, got {type(obj).__name__}")
    values = []
    for key in keys:
        if key not in obj:
            raise DocumentError(f"missing key {key!r} (keys present: {sorted(obj)[:10]})")
        value = obj[key]
        if not isinstance(value, str):
            raise DocumentError(f"key {key!r} holds {type(value).__name__}, expected a string")
        if not value.isascii():
            _check_encodable(key, value)
        values.append(value)
    return values


def _check_encodable(key: str, value: str) -> None:
    # JSON escapes can spell lone surrogates ("\\ud800"), which no tokenizer can encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DocumentError(f"key {key!r} holds an unpaired surrogate at character {e.start}"
                            ) from None


def iter_documents(paths: Sequence[str], key: str = "text") -> Iterator[str]:
    """Every document's text under ``key``, in order; the first bad line raises with its place."""
    for path in expand_inputs(paths):
        for line_no, line in iter_lines(path):
            if is_blank(line):
                continue
            try:
                yield parse_document(line, (key,))[0]
            except DocumentError as e:
                raise DocumentError(f"{path}:{line_no}: {e}") from None

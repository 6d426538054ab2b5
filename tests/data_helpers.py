"""Helpers shared by the data tests (their fixtures live in tests/unit/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path


UNICODE_DOCS = [
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, עברית.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew\nlines\n\nand a blank line",
    "x",
]
TOKENIZER_KINDS = ("sentencepiece", "huggingface")


def write_jsonl(path: Path, docs, key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc}, ensure_ascii=False) + "\n")
    return path

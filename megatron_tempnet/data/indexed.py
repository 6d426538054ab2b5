"""Megatron indexed datasets (.bin/.idx): a streaming writer, a validating reader, merging.

The format is megatron-core's ``IndexedDataset`` (version 1, not multimodal):

    .idx: b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count S
          | <Q document count D | int32[S] sequence lengths | int64[S] byte offsets into .bin
          | int64[D] document boundaries (sequence indices, starting 0, ending S)
    .bin: the tokens of all sequences, back to back, in the dtype of the code

The writer keeps O(1) memory whatever the corpus size: tokens stream to the .bin, sequence
lengths and document boundaries stream to side files, and the .idx is assembled from them in
chunks at the end. Everything is written under temporary names and renamed when complete, the
.idx last, so an interrupted run never leaves a pair that looks complete.

Reading checks the whole index in numpy chunks (O(sequences + documents), no Python loop per
document); the smallest and largest token id of a .bin are scanned once and cached beside it in
``<prefix>.stats.json``, keyed on the files' identity (:func:`file_identity`).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatron_tempnet.config import ConfigError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
               np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
               np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
CHUNK_ITEMS = 1 << 20
SCAN_CHUNK_BYTES = 32 << 20  # .bin bytes read at a time by the token-id scan
TMP_SUFFIX = ".tmp"
STATS_SUFFIX = ".stats.json"


class CorruptDatasetError(ConfigError):
    """A .bin/.idx pair that is missing, truncated or not in the indexed-dataset format."""


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


@dataclass
class IndexInfo:
    """A validated .idx file; the arrays are read-only views of the mapped file."""

    path: str
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32[S]
    sequence_pointers: np.ndarray  # int64[S]
    document_indices: np.ndarray  # int64[D]
    num_tokens: int  # sum of the sequence lengths

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def bin_bytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize


def _corrupt(path: str, problem: str) -> CorruptDatasetError:
    return CorruptDatasetError(f"{path}: {problem}; the dataset is corrupt or was not written "
                               f"completely: re-create it with tools/preprocess_data.py")


def read_index(path: str) -> IndexInfo:
    """Read and check an .idx file; errors name the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise CorruptDatasetError(f"index file {path!r} not found")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise _corrupt(path, f"only {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    header = bytes(data[:HEADER_BYTES])
    if header[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise _corrupt(path, f"bad header {header[:len(INDEX_HEADER)]!r} (expected "
                             f"{INDEX_HEADER!r}): not a Megatron indexed-dataset index")
    version, code, num_seq, num_doc = struct.unpack("<QBQQ", header[len(INDEX_HEADER):])
    if version != INDEX_VERSION:
        raise _corrupt(path, f"index version {version}, only version {INDEX_VERSION} is known")
    if code not in CODE_DTYPES:
        raise _corrupt(path, f"unknown dtype code {code}")
    expected = HEADER_BYTES + 12 * num_seq + 8 * num_doc
    if size not in (expected, expected + num_seq):  # + int8 modes when multimodal
        raise _corrupt(path, f"{size} bytes, but its header ({num_seq} sequences, {num_doc} "
                             f"document boundaries) implies {expected}")
    lengths = np.frombuffer(data, np.int32, num_seq, HEADER_BYTES)
    pointers = np.frombuffer(data, np.int64, num_seq, HEADER_BYTES + 4 * num_seq)
    documents = np.frombuffer(data, np.int64, num_doc, HEADER_BYTES + 12 * num_seq)
    if num_doc == 0 or documents[0] != 0 or documents[-1] != num_seq:
        span = f"{documents[0]} to {documents[-1]}" if num_doc else "nowhere (there are none)"
        raise _corrupt(path, f"document boundaries run from {span}, not from 0 to the sequence "
                             f"count {num_seq}")
    dtype = CODE_DTYPES[code]
    num_tokens = _check_lengths_and_pointers(path, lengths, pointers, dtype.itemsize)
    _check_document_boundaries(path, documents)
    return IndexInfo(path, dtype, lengths, pointers, documents, num_tokens)


def _check_lengths_and_pointers(path: str, lengths: np.ndarray, pointers: np.ndarray,
                                itemsize: int) -> int:
    """Lengths >= 0 and each byte offset the running sum of the lengths before it (offset 0
    first), in chunks; returns the token count."""
    tokens = 0
    for start in range(0, len(lengths), CHUNK_ITEMS):
        chunk = lengths[start:start + CHUNK_ITEMS]
        if chunk.min() < 0:
            i = start + int(np.argmax(chunk < 0))
            raise _corrupt(path, f"sequence {i} has length {lengths[i]} (lengths must be >= 0)")
        ends = np.cumsum(chunk, dtype=np.int64)
        ends += tokens
        expected = (ends - chunk) * itemsize
        wrong = np.flatnonzero(pointers[start:start + CHUNK_ITEMS] != expected)
        if len(wrong):
            i = start + int(wrong[0])
            raise _corrupt(path, f"sequence {i} starts at byte {pointers[i]} of the .bin, but the "
                                 f"lengths of the sequences before it put it at byte "
                                 f"{expected[wrong[0]]} (offsets and lengths disagree)")
        tokens = int(ends[-1])
    return tokens


def _check_document_boundaries(path: str, documents: np.ndarray) -> None:
    """Document boundaries non-decreasing (their ends are checked by the caller), in chunks."""
    for start in range(0, len(documents) - 1, CHUNK_ITEMS):
        falls = np.flatnonzero(np.diff(documents[start:start + CHUNK_ITEMS + 1]) < 0)
        if len(falls):
            j = start + int(falls[0]) + 1
            raise _corrupt(path, f"document boundary {j} is sequence {documents[j]}, before "
                                 f"boundary {j - 1} (sequence {documents[j - 1]}): document "
                                 f"boundaries must not decrease")


def check_indexed_dataset(prefix: str) -> IndexInfo:
    """Check a .bin/.idx pair before megatron-core opens it (its own checks are bare asserts)."""
    missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if os.path.isfile(bin_path(prefix) + TMP_SUFFIX) or os.path.isfile(idx_path(prefix)
                                                                             + TMP_SUFFIX):
            hint = " (only temporary files exist: the run that wrote it did not finish)"
        raise CorruptDatasetError(f"dataset prefix {prefix!r}: missing {', '.join(missing)}"
                                  f"{hint}; tools/preprocess_data.py writes "
                                  f"<output-prefix>_<json-key>_document.bin/.idx")
    info = read_index(idx_path(prefix))
    actual = os.path.getsize(bin_path(prefix))
    if actual != info.bin_bytes:
        raise _corrupt(bin_path(prefix), f"{actual} bytes, but {info.path} describes "
                                         f"{info.bin_bytes}")
    return info


def file_identity(prefix: str) -> dict[str, list[int]]:
    """[size, mtime_ns, inode] of the .bin and the .idx: changes whenever either is rewritten."""
    identity = {}
    for kind, path in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
        st = os.stat(path)
        identity[kind] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return identity


def stats_path(prefix: str) -> str:
    return prefix + STATS_SUFFIX


def token_id_range(prefix: str, info: IndexInfo | None = None) -> tuple[int, int]:
    """(smallest, largest) token id of a dataset ((0, -1) when it has no tokens).

    One pass over the .bin in ``SCAN_CHUNK_BYTES`` chunks (memory stays bounded), cached in
    ``<prefix>.stats.json`` under the data files' :func:`file_identity` and recomputed when
    they change; a directory that cannot be written just means no cache.
    """
    identity = file_identity(prefix)
    try:
        with open(stats_path(prefix)) as f:
            cached = json.load(f)
        if cached["identity"] == identity:
            return int(cached["min_token_id"]), int(cached["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    info = info if info is not None else check_indexed_dataset(prefix)
    low, high = _scan_token_range(bin_path(prefix), info.dtype)
    _write_json_atomically(stats_path(prefix), {"identity": identity, "min_token_id": low,
                                                "max_token_id": high})
    return low, high


def _scan_token_range(path: str, dtype: np.dtype) -> tuple[int, int]:
    lows, highs = [0], [-1]
    with open(path, "rb") as f:
        while len(chunk := np.fromfile(f, dtype=dtype, count=SCAN_CHUNK_BYTES // dtype.itemsize)):
            highs.append(int(chunk.max()))
            lows.append(int(chunk.min()))
    return (min(lows[1:]) if len(lows) > 1 else 0), max(highs)


def _write_json_atomically(path: str, record: dict) -> bool:
    """Temp file in the same directory + os.replace; False (nothing written) when it cannot."""
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TMP_SUFFIX)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
        return True
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        return False


class IndexedDatasetWriter:
    """Streams documents into ``<prefix>.bin``/``<prefix>.idx``; use as a context manager.

    On an exception inside the ``with`` block, or on ``abort()``, the temporary files are
    removed and no output appears.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no indexed-dataset code")
        self._tmp = {name: prefix + suffix for name, suffix in
                     (("bin", ".bin" + TMP_SUFFIX), ("idx", ".idx" + TMP_SUFFIX),
                      ("lengths", ".lengths" + TMP_SUFFIX), ("docs", ".docs" + TMP_SUFFIX))}
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(self._tmp["bin"], "wb")
        self._lengths = open(self._tmp["lengths"], "wb")
        self._docs = open(self._tmp["docs"], "wb")
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents of one sequence each: ``tokens`` concatenated, ``lengths`` per doc."""
        lengths = np.asarray(lengths, dtype=np.int32)
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.write(lengths.tobytes())
        ends = np.arange(self.num_sequences + 1, self.num_sequences + len(lengths) + 1,
                         dtype=np.int64)
        self._docs.write(ends.tobytes())
        self.num_sequences += len(lengths)
        self.num_documents += len(lengths)
        self.num_tokens += int(lengths.sum(dtype=np.int64))

    def add_document(self, tokens: Sequence[int], sequence_lengths: Sequence[int] | None = None
                     ) -> None:
        """Append one document, optionally made of several sequences (e.g. sentences)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray([len(tokens)] if sequence_lengths is None else sequence_lengths,
                             dtype=np.int32)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())}, "
                             f"the document has {len(tokens)} tokens")
        self._bin.write(tokens.tobytes())
        self._lengths.write(lengths.tobytes())
        self.num_sequences += len(lengths)
        self._docs.write(np.int64(self.num_sequences).tobytes())
        self.num_documents += 1
        self.num_tokens += len(tokens)

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (checked first), converting its dtype if needed."""
        info = check_indexed_dataset(prefix)
        for start in range(0, info.num_sequences, CHUNK_ITEMS):
            self._lengths.write(info.sequence_lengths[start:start + CHUNK_ITEMS].tobytes())
        for start in range(1, info.num_documents + 1, CHUNK_ITEMS):
            ends = info.document_indices[start:start + CHUNK_ITEMS] + self.num_sequences
            self._docs.write(ends.tobytes())
        self._copy_tokens(bin_path(prefix), info.dtype)
        self.num_sequences += info.num_sequences
        self.num_documents += info.num_documents
        self.num_tokens += info.num_tokens

    def _copy_tokens(self, path: str, dtype: np.dtype) -> None:
        with open(path, "rb") as src:
            if dtype == self.dtype:
                shutil.copyfileobj(src, self._bin, 16 << 20)
                return
            while True:
                chunk = np.fromfile(src, dtype=dtype, count=CHUNK_ITEMS)
                if not len(chunk):
                    break
                if chunk.max(initial=0) > np.iinfo(self.dtype).max:
                    raise ValueError(f"{path} holds token ids above {self.dtype}'s range")
                self._bin.write(chunk.astype(self.dtype).tobytes())

    def finalize(self) -> tuple[str, str]:
        """Write the .idx and move both files to their final names; returns (bin, idx) paths."""
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        self._write_index()
        final_bin, final_idx = bin_path(self.prefix), idx_path(self.prefix)
        if os.path.exists(final_idx):  # never pair an old .idx with the new .bin
            os.remove(final_idx)
        os.replace(self._tmp["bin"], final_bin)
        os.replace(self._tmp["idx"], final_idx)
        self._remove_side_files()
        return final_bin, final_idx

    def _write_index(self) -> None:
        itemsize = self.dtype.itemsize
        with open(self._tmp["idx"], "wb") as out:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<QBQQ", INDEX_VERSION, DTYPE_CODES[self.dtype],
                                  self.num_sequences, self.num_documents + 1))
            with open(self._tmp["lengths"], "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
            offset = np.int64(0)
            with open(self._tmp["lengths"], "rb") as f:
                while len(lengths := np.fromfile(f, dtype=np.int32, count=CHUNK_ITEMS)):
                    ends = np.cumsum(lengths, dtype=np.int64) * itemsize + offset
                    out.write((ends - lengths.astype(np.int64) * itemsize).tobytes())
                    offset = ends[-1]
            out.write(np.int64(0).tobytes())
            with open(self._tmp["docs"], "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)

    def _remove_side_files(self) -> None:
        for name in ("lengths", "docs"):
            if os.path.exists(self._tmp[name]):
                os.remove(self._tmp[name])

    def abort(self) -> None:
        """Close and delete every temporary file; the final names are left untouched."""
        for f in (self._bin, self._lengths, self._docs):
            f.close()
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> IndexInfo:
    """Concatenate datasets into ``output_prefix``; mixed uint16/int32 inputs give int32."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    infos = [check_indexed_dataset(p) for p in prefixes]
    dtype = max((info.dtype for info in infos), key=lambda d: d.itemsize)
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
        writer.finalize()
    return check_indexed_dataset(output_prefix)

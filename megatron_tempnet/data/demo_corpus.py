"""Deterministic demo corpora with no download, from the Python standard library.

``--kind docstrings`` (default, ``make demo``'s): a fixed, sorted list of stdlib modules is walked
(module, then the classes and functions it defines, by sorted name, with the classes' members);
every distinct docstring becomes one JSONL document ``{"text": ...}``, followed by the
language-reference topics of ``pydoc_data``.

``--kind code`` (a second, different distribution: source code): the same modules' own ``.py``
files, one document per top-level statement group (a class, a function with its decorators,
or a run of consecutive other statements), with the module name as a first comment line.

The same Python version gives the same bytes.

    python -m megatron_tempnet.data.demo_corpus --output demo.jsonl [--kind code]
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import pkgutil
import warnings
from typing import Iterator

DEFAULT_MAX_BYTES = 4_000_000
# Top-level stdlib modules importable in every CPython 3.11 build on Linux, sorted; packages are
# walked into their public submodules. Left out: modules with import side effects or
# deprecation noise (idlelib, lib2to3, distutils, rlcompleter, this, antigravity, ...), optional C
# extensions (sqlite3, ssl, tkinter, curses, ...) and the test suite.
MODULES = (
    "abc", "aifc", "argparse", "array", "ast", "asyncio", "atexit", "audioop", "base64", "bdb",
    "binascii", "bisect", "builtins", "cProfile", "calendar", "chunk", "cmath", "cmd", "code",
    "codecs", "codeop", "collections", "colorsys", "compileall", "concurrent", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "enum", "errno", "faulthandler", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "genericpath", "getopt",
    "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "http", "imaplib", "imghdr", "importlib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "mailbox", "mailcap", "marshal", "math",
    "mimetypes", "mmap", "modulefinder", "multiprocessing", "netrc", "nntplib", "ntpath",
    "nturl2path", "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "pipes", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "profile", "pstats", "py_compile", "pyclbr", "pyexpat", "queue", "quopri", "random", "re",
    "reprlib", "runpy", "sched", "secrets", "select", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "sndhdr", "socket", "socketserver", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "sunau", "symtable", "sys",
    "sysconfig", "tabnanny", "tarfile", "telnetlib", "tempfile", "textwrap", "threading", "time",
    "timeit", "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types",
    "typing", "unicodedata", "unittest", "urllib", "uu", "uuid", "warnings", "wave", "weakref",
    "wsgiref", "xdrlib", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


def _import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def _is_public(module_name: str) -> bool:
    return not any(part.startswith("_") or part in ("test", "tests")
                   for part in module_name.split(".")[1:])


def iter_module_names() -> Iterator[str]:
    """MODULES and, for packages, their public submodules in sorted order."""
    for name in MODULES:
        module = _import(name)
        yield name
        if hasattr(module, "__path__"):
            subs = sorted(m.name for m in pkgutil.walk_packages(module.__path__, name + ".",
                                                                onerror=lambda _: None))
            for sub in filter(_is_public, subs):
                try:
                    _import(sub)
                except Exception:  # platform-only submodules (asyncio.windows_events, ...)
                    continue
                yield sub


def _unwrap(obj):
    return obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj


def _defined_in(owner, module_name: str) -> Iterator[tuple[str, object]]:
    """(name, object) of the classes and routines ``owner`` defines itself, by sorted name."""
    for name in sorted(vars(owner)):
        obj = _unwrap(vars(owner)[name])
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and \
                getattr(obj, "__module__", None) == module_name:
            yield name, obj


def _class_members(cls) -> Iterator[tuple[str, object]]:
    for name in sorted(vars(cls)):
        obj = _unwrap(vars(cls)[name])
        if name.startswith("__") and name != "__init__":
            continue
        if inspect.isroutine(obj) or inspect.isdatadescriptor(obj):
            yield name, obj


def iter_documented(module_name: str) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) for a module, its classes, their members, and its
    functions."""
    module = _import(module_name)
    named = [(module_name, module)]
    for name, obj in _defined_in(module, module_name):
        named.append((f"{module_name}.{name}", obj))
        if inspect.isclass(obj):
            named.extend((f"{module_name}.{name}.{m}", o) for m, o in _class_members(obj))
    for qualname, obj in named:
        with warnings.catch_warnings():  # typing.io and typing.re warn on attribute access
            warnings.simplefilter("ignore")
            doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            yield qualname, inspect.cleandoc(doc)


def iter_demo_documents() -> Iterator[str]:
    """Every distinct docstring as "<qualified name>\\n\\n<docstring>", then the reference
    topics of pydoc_data (the text of help("topic")), in a fixed order."""
    seen: set[str] = set()
    for module_name in iter_module_names():
        for qualname, doc in iter_documented(module_name):
            if doc not in seen:
                seen.add(doc)
                yield f"{qualname}\n\n{doc}"
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"{name}\n\n{topics[name].strip()}"


MAX_CODE_DOC_CHARS = 6000  # longer top-level blocks (a big class) are cut at a line end


def _source_blocks(source: str) -> Iterator[str]:
    """The top-level blocks of a module's source: each class / function (decorators included),
    and each run of other consecutive top-level statements, as text."""
    lines = source.splitlines()
    pending: list[str] = []
    for node in ast.parse(source).body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = "\n".join(lines[start - 1:node.end_lineno])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if pending:
                yield "\n".join(pending)
                pending = []
            yield text
        else:
            pending.append(text)
    if pending:
        yield "\n".join(pending)


def iter_code_documents() -> Iterator[str]:
    """Every distinct top-level block of the modules' .py sources (``--kind code``) as
    "# <module>\n<block>", in the modules' fixed order; built-in modules have no source."""
    seen: set[str] = set()
    for module_name in iter_module_names():
        path = getattr(_import(module_name), "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for block in _source_blocks(source):
            if len(block) > MAX_CODE_DOC_CHARS:
                block = block[:block.rfind("\n", 0, MAX_CODE_DOC_CHARS)]
            if len(block.strip()) >= 40 and block not in seen:
                seen.add(block)
                yield f"# {module_name}\n{block}"


KINDS = {"docstrings": iter_demo_documents, "code": iter_code_documents}


def write_demo_corpus(path: str, max_bytes: int = DEFAULT_MAX_BYTES,
                      kind: str = "docstrings") -> int:
    """Write the corpus (``KINDS``) as JSONL, stopping before ``max_bytes``; returns the bytes
    written."""
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}; choose one of {sorted(KINDS)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = 0
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for doc in KINDS[kind]():
            line = (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8")
            if written + len(line) > max_bytes:
                break
            f.write(line)
            written += len(line)
    os.replace(tmp, path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the .jsonl file to write")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--kind", default="docstrings", choices=sorted(KINDS),
                        help="docstrings (default) or code (the modules' source)")
    args = parser.parse_args(argv)
    n = write_demo_corpus(args.output, args.max_bytes, args.kind)
    print(f"wrote {n} bytes to {args.output}")


if __name__ == "__main__":
    main()

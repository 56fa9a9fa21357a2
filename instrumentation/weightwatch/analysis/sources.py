"""Find the inputs (files, directories, ``-``, ``.gz``) and read them into Sources.

Every log is read block by block (plain files through ``mmap``, compressed files and stdin as streams) and each
block goes through the one bulk reader, ``scan.scan``, which uses all cores itself. Span files (JSON lines) go
to ``collect.spans_to_source``.
"""

from __future__ import annotations

import gzip
import io
import mmap
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from weightwatch.analysis.collect import Source, spans_to_source

#: Bytes parsed at once (bounds memory: a block's lines and its regex columns live only while it is parsed).
BLOCK_BYTES = 16 * 1024 * 1024
_LOG_NAME = re.compile(r"\.log(\.\d+)?(\.gz)?$|\.gz$|\.spans\.jsonl(\.gz)?$")


class InputError(Exception):
    """An input that cannot be read at all (missing path, unreadable file): a usage error."""


@dataclass(frozen=True)
class Input:
    path: str  # "-" for stdin
    kind: str  # "log" or "spans"

    @property
    def compressed(self) -> bool:
        return self.path.endswith(".gz")


def _kind_of(name: str) -> str:
    base = name[:-3] if name.endswith(".gz") else name
    return "spans" if base.endswith(".jsonl") else "log"


def expand(paths: Sequence[str]) -> list[Input]:
    """Files as given (``*.jsonl`` read as span files), directories as every *.log, *.log.N, *.gz, *.spans.jsonl
    inside (recursively), ``-`` as stdin (span lines recognised by their leading ``{``)."""
    out: list[Input] = []
    seen: set[str] = set()
    for raw in paths:
        if raw == "-":
            if "-" not in seen:
                out.append(Input("-", "log"))
                seen.add("-")
            continue
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _LOG_NAME.search(f.name))
            for f in found:
                if str(f) not in seen:
                    seen.add(str(f))
                    out.append(Input(str(f), _kind_of(f.name)))
        elif p.is_file():
            if str(p) not in seen:
                seen.add(str(p))
                out.append(Input(str(p), _kind_of(p.name)))
        elif p.exists():
            raise InputError(f"{raw}: not a regular file or directory")
        else:
            raise InputError(f"{raw}: no such file or directory")
    return out


def _blocks(fh: BinaryIO, size: int | None = None) -> Iterator[bytes]:
    """Newline-aligned blocks of a stream (the last one may lack the final newline)."""
    size = size or BLOCK_BYTES
    carry = b""
    while True:
        chunk = fh.read(size)
        if not chunk:
            break
        chunk = carry + chunk
        cut = chunk.rfind(b"\n")
        if cut < 0:
            carry = chunk
            continue
        carry = chunk[cut + 1:]
        yield chunk[: cut + 1]
    if carry:
        yield carry


def _open(inp: Input) -> BinaryIO:
    if inp.path == "-":
        return sys.stdin.buffer
    fh: BinaryIO = open(inp.path, "rb")
    if inp.compressed:
        return gzip.GzipFile(fileobj=fh)  # type: ignore[return-value]
    return fh


def _stream(inp: Input, fh: BinaryIO, first: bytes = b"") -> Source:
    total = Source(inp.path if inp.path != "-" else "<stdin>")
    stream: BinaryIO = fh if not first else io.BufferedReader(_Prepend(first, fh))  # type: ignore[arg-type]
    for block in _blocks(stream):
        total.add_block(block)
    return total


class _Prepend(io.RawIOBase):
    """A stream with some already-read bytes put back in front (stdin sniffing)."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(b))
        b[: len(data)] = data
        return len(data)


def _read_file(path: str) -> Source:
    """A plain file through mmap, in newline-aligned blocks (the page cache is the only copy of the whole file)."""
    total = Source(path)
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return total
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start, size = 0, len(mm)
            while start < size:
                end = mm.find(b"\n", min(start + BLOCK_BYTES, size) - 1)
                end = size if end < 0 else end + 1
                total.add_block(mm[start:end])
                start = end
    return total


def read_inputs(inputs: Sequence[Input], jobs: int | None = None) -> list[Source]:
    """One Source per log stream (rotated pieces joined), in input order. Unreadable inputs raise InputError.

    ``jobs`` caps the threads the reader uses (polars' pool is sized once per process: set POLARS_MAX_THREADS).
    """
    out: list[Source] = []
    for inp in inputs:
        try:
            if inp.path == "-":
                fh = sys.stdin.buffer
                first = fh.readline()
                if first.lstrip().startswith(b"{"):
                    rest = io.TextIOWrapper(fh, encoding="utf-8", errors="replace")
                    out.append(spans_to_source("<stdin>", [first.decode("utf-8", "replace"), *rest]))
                else:
                    out.append(_stream(inp, fh, first))
                continue
            if inp.kind == "spans":
                with _open(inp) as fh:
                    out.append(spans_to_source(inp.path, io.TextIOWrapper(fh, encoding="utf-8", errors="replace")))
                continue
            if inp.compressed:
                with _open(inp) as fh:
                    out.append(_stream(inp, fh))
            else:
                out.append(_read_file(inp.path))
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"{inp.path}: cannot read: {exc}") from exc
    return merge_rotated(out)


_ROTATED = re.compile(r"^(?P<base>.+?)(?:\.(?P<n>\d+))?(?:\.gz)?$")


def _rotation(source: str) -> tuple[str, int]:
    """(the live log's name, age) for logrotate names: x.log.2.gz is older than x.log.1, older than x.log."""
    m = _ROTATED.match(source)
    if m is None or source == "<stdin>":
        return source, 0
    return m.group("base"), int(m.group("n") or 0)


def merge_rotated(parts: list[Source]) -> list[Source]:
    """One Source per log stream: rotated pieces (x.log.2.gz, x.log.1, x.log) joined oldest first.

    A rotation splits updates across files (client.send before it, client.done after); joining needs
    the whole stream, in order.
    """
    groups: dict[str, list[tuple[int, Source]]] = {}
    for p in parts:
        base, age = _rotation(p.source) if p.origin == "log" else (p.source, 0)
        groups.setdefault(base, []).append((age, p))
    out: list[Source] = []
    for base, members in groups.items():
        if len(members) == 1:
            out.append(members[0][1])
            continue
        members.sort(key=lambda m: -m[0])
        merged = Source(base, origin=members[0][1].origin)
        for _age, p in members:
            merged.append(p)
        out.append(merged)
    return out

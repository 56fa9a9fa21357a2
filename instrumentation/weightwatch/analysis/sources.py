"""Find the inputs (files, directories, ``-``, ``.gz``) and read them into Partials.

Big plain files are cut into newline-aligned byte ranges and scanned by a process pool (mmap, bytes
regexes); compressed files and stdin are streamed block by block. Span files (JSON lines) go to
``collect.spans_to_partial``.
"""

from __future__ import annotations

import gzip
import io
import mmap
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from weightwatch.analysis.collect import Partial, scan_block, spans_to_partial

#: Bytes per block a worker parses at once (bounds memory; the pool balances over blocks).
BLOCK_BYTES = 32 * 1024 * 1024
#: Smallest range handed to a worker (smaller ones cost more in pickling than they save).
MIN_BLOCK_BYTES = 1 << 20
#: Files smaller than this are read in the calling process: a pool costs more than it saves.
PARALLEL_MIN_BYTES = 48 * 1024 * 1024
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


def _blocks(fh: BinaryIO, size: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Newline-aligned blocks of a stream (the last one may lack the final newline)."""
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


def _stream(inp: Input, fh: BinaryIO, first: bytes = b"") -> Partial:
    total = Partial(inp.path if inp.path != "-" else "<stdin>")
    stream: BinaryIO = fh if not first else io.BufferedReader(_Prepend(first, fh))  # type: ignore[arg-type]
    for i, block in enumerate(_blocks(stream)):
        total.extend(scan_block(total.source, block, i))
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


def _ranges(path: str, size: int, block: int) -> list[tuple[int, int]]:
    """Newline-aligned byte ranges of about ``block`` bytes covering the file."""
    bounds = [0]
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = block
        while pos < size:
            nl = mm.find(b"\n", pos)
            if nl < 0:
                break
            bounds.append(nl + 1)
            pos = nl + 1 + block
    if bounds[-1] < size:
        bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _scan_range(job: tuple[str, int, int, int]) -> Partial:
    path, index, start, end = job
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return scan_block(path, mm[start:end], index)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def read_inputs(inputs: Sequence[Input], jobs: int | None = None) -> list[Partial]:
    """One merged Partial per input, in input order. Unreadable inputs raise InputError."""
    jobs = default_jobs() if jobs is None else max(1, jobs)
    out: list[Partial] = []
    big: list[tuple[int, str, list[tuple[int, int]]]] = []
    slots: list[Partial | None] = []
    for inp in inputs:
        try:
            if inp.path == "-":
                fh = sys.stdin.buffer
                first = fh.readline()
                if first.lstrip().startswith(b"{"):
                    rest = io.TextIOWrapper(fh, encoding="utf-8", errors="replace")
                    lines = [first.decode("utf-8", "replace"), *rest]
                    slots.append(spans_to_partial("<stdin>", lines))
                else:
                    slots.append(_stream(inp, fh, first))
                continue
            if inp.kind == "spans":
                with _open(inp) as fh:
                    text = io.TextIOWrapper(fh, encoding="utf-8", errors="replace")
                    slots.append(spans_to_partial(inp.path, text))
                continue
            size = os.path.getsize(inp.path)
            if not inp.compressed and jobs > 1 and size >= PARALLEL_MIN_BYTES:
                block = max(MIN_BLOCK_BYTES, min(BLOCK_BYTES, size // (jobs * 4) + 1))
                big.append((len(slots), inp.path, _ranges(inp.path, size, block)))
                slots.append(None)
                continue
            with _open(inp) as fh:
                slots.append(_stream(inp, fh))
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{inp.path}: cannot read: {exc}") from exc
    if big:
        _scan_parallel(big, slots, jobs)
    for s in slots:
        assert s is not None
        out.append(s)
    return merge_rotated(out)


_ROTATED = re.compile(r"^(?P<base>.+?)(?:\.(?P<n>\d+))?(?:\.gz)?$")


def _rotation(source: str) -> tuple[str, int]:
    """(the live log's name, age) for logrotate names: x.log.2.gz is older than x.log.1, older than x.log."""
    m = _ROTATED.match(source)
    if m is None or source == "<stdin>":
        return source, 0
    return m.group("base"), int(m.group("n") or 0)


def merge_rotated(parts: list[Partial]) -> list[Partial]:
    """One Partial per log stream: rotated pieces (x.log.2.gz, x.log.1, x.log) joined oldest first.

    A rotation splits updates across files (client.send before it, client.done after); joining needs
    the whole stream, in order.
    """
    groups: dict[str, list[tuple[int, Partial]]] = {}
    for p in parts:
        base, age = _rotation(p.source) if p.origin == "log" else (p.source, 0)
        groups.setdefault(base, []).append((age, p))
    out: list[Partial] = []
    for base, members in groups.items():
        if len(members) == 1:
            out.append(members[0][1])
            continue
        members.sort(key=lambda m: -m[0])
        merged = Partial(base, origin=members[0][1].origin)
        for _age, p in members:
            merged.extend(p.shifted(merged.n))
        out.append(merged)
    return out


def _scan_parallel(big: list[tuple[int, str, list[tuple[int, int]]]], slots: list[Partial | None], jobs: int) -> None:
    import multiprocessing

    work = [(path, i, a, b) for _, path, ranges in big for i, (a, b) in enumerate(ranges)]
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs) as pool:
            parts = pool.map(_scan_range, work, chunksize=1)
    except (OSError, ValueError):  # no fork or no semaphores here: do it in this process
        parts = [_scan_range(w) for w in work]
    i = 0
    for slot, path, ranges in big:
        merged = Partial(path)
        for _ in ranges:
            merged.extend(parts[i])
            i += 1
        slots[slot] = merged

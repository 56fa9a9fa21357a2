"""Check a weight directory against the served model before the engine touches it.

vLLM 0.32's in-place ``reload_weights`` is not transactional: it moves every layer to the meta device,
then loads; a tensor that fails half-way (wrong shape, truncated file) leaves the model unusable and
the next forward pass kills the engine. So the admin API reads the safetensors *headers* (a few KB,
no tensor data) and refuses, with a 400 and the reason, any directory whose tensors do not match the
served model's own checkpoint by name and shape, or whose files are truncated.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

#: safetensors dtypes a float model can load (vLLM casts between them).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(ValueError):
    """The directory cannot be loaded into the served model; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one safetensors file; CheckpointError if malformed or truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path.name}: shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path.name}: header length {n} does not fit the file ({size} bytes)")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if not (0 <= start <= end <= data_len):
            raise CheckpointError(f"{path.name}: tensor {name!r} lies beyond the end of the file (truncated write?)")
        tensors[name] = TensorInfo(str(dtype), shape, path.name)
    return tensors


def describe(directory: Path) -> dict[str, TensorInfo]:
    """All tensors of the ``*.safetensors`` files directly inside ``directory``."""
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors and tensors[name].file != info.file:
                # vLLM would load both; keep the first and let the shape check below judge.
                continue
            tensors[name] = info
    return tensors


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_compatible(candidate: dict[str, TensorInfo], expected: dict[str, TensorInfo] | None) -> None:
    """CheckpointError unless ``candidate`` has float tensors with the expected names and shapes."""
    bad_dtype = sorted(n for n, t in candidate.items() if t.dtype not in FLOAT_DTYPES)
    if bad_dtype:
        raise CheckpointError(f"non-float tensors: {_list([f'{n} ({candidate[n].dtype})' for n in bad_dtype])}")
    if expected is None:
        return
    missing = sorted(set(expected) - set(candidate))
    if missing:
        raise CheckpointError(f"missing tensors the served model needs: {_list(missing)}")
    unknown = sorted(set(candidate) - set(expected))
    if unknown:
        raise CheckpointError(f"tensors the served model does not have: {_list(unknown)}")
    wrong = sorted(n for n in expected if candidate[n].shape != expected[n].shape)
    if wrong:
        details = [f"{n} is {list(candidate[n].shape)}, expected {list(expected[n].shape)}" for n in wrong]
        raise CheckpointError(f"shape mismatch: {_list(details, 3)}")

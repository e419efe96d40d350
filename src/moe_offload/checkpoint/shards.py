"""Reading a sharded safetensors checkpoint: its index and each shard's header.

The header parser here is deliberately our own (8-byte little-endian length, JSON, data): validation
uses it to read source bytes at the offsets the shard declares, a path independent of the extractor's,
which goes through the safetensors library.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict, absolute offset where the data section starts); checks it fits the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER:  # any other file's first 8 bytes read as an absurd length: do not echo it
                raise InputError(f"{path}: not a safetensors file (its first 8 bytes are no header length)")
            if 8 + n > size:
                raise InputError(f"{path}: not a safetensors file, or truncated inside its header "
                                 f"({n}-byte header, the file has {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except OSError as err:  # a directory, a dangling link, no permission
        raise InputError(f"{path}: cannot be read as a safetensors file ({err.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: corrupt safetensors header ({err})") from None
    start = 8 + n
    data_len = size - start
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            expected = DTYPE_BYTES[entry["dtype"]]
            for dim in entry["shape"]:
                if not is_count(dim):
                    raise ValueError(dim)
                expected *= dim
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: corrupt safetensors header entry for {name}") from None
        if not (is_count(begin) and is_count(end)) or end - begin != expected:
            raise InputError(f"{path}: corrupt safetensors header: {name} spans {begin}..{end}, its shape needs {expected} bytes")
        if end > data_len:
            raise InputError(f"{path}: truncated shard: {name} ends at byte {start + end}, file has {size}")
        spans.append((begin, end, name))
    overlap = first_overlap(spans)
    if overlap:
        raise InputError(f"{path}: corrupt safetensors header: {overlap[0]} and {overlap[1]} share bytes")
    return header, start


def is_count(value) -> bool:
    """A non-negative JSON integer (bool is an int in Python, not in the format)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def first_overlap(spans: list[tuple[int, int, str]]) -> tuple[str, str] | None:
    """Names of two tensors whose byte ranges [begin, end) intersect, if any."""
    last_end, last_name = 0, None
    for begin, end, name in sorted(spans):
        if begin < last_end:
            return last_name, name
        if end > last_end:
            last_end, last_name = end, name
    return None


def inside_name(name) -> bool:
    """A shard name from an index that stays inside the checkpoint directory: relative, no `..`. Checked
    on the name, not the resolved path, because hub snapshots hold symlinks into their blob store."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts and pure.parts[0:1] != ("~",)


def link_roots(checkpoint_dir: str | Path) -> list[Path]:
    """Where a shard of checkpoint_dir may resolve to: the checkpoint directory itself, and for a
    Hugging Face hub snapshot (<cache>/models--org--name/snapshots/<revision>/, whose files are symlinks
    into ../../blobs/) that repo's blobs/ folder."""
    root = Path(checkpoint_dir).resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return roots


def check_link(checkpoint_dir: str | Path, path: Path) -> Path:
    """path (a shard of checkpoint_dir), refused if it or a folder on its way is a symlink that leads out
    of link_roots: its bytes would escape the checkpoint that the index and manifest describe."""
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in link_roots(checkpoint_dir)):
        raise InputError(f"{path}: a symlink that leads out of the checkpoint directory; a shard may link only "
                         "inside it, or into the hub cache's blobs/ folder of its repo")
    return path


def header_tensors(path: str | Path, parsed: tuple[dict, int] | None = None) -> dict[str, TensorInfo]:
    """Each tensor of a safetensors file at its absolute offset; `parsed`: read_header's result, if at hand."""
    header, start = parsed or read_header(path)
    return {
        name: TensorInfo(name, Path(path), e["dtype"], tuple(e["shape"]), start + e["data_offsets"][0],
                         e["data_offsets"][1] - e["data_offsets"][0])
        for name, e in header.items()
        if name != "__metadata__"
    }


def read_bytes(info: TensorInfo) -> bytes:
    with open(info.file, "rb") as f:
        return os.pread(f.fileno(), info.nbytes, info.offset)


class Checkpoint:
    """A checkpoint directory: tensor name -> shard, through model.safetensors.index.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"checkpoint directory {self.path} is a file, not a directory")
        if not self.path.is_dir():
            raise InputError(f"checkpoint directory {self.path} does not exist")
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
                if not isinstance(self.weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as err:
                raise InputError(f"{index}: not a safetensors index ({err})") from None
            for tensor, shard in self.weight_map.items():
                if not inside_name(shard):  # never opened, never echoed
                    raise InputError(f"{index}: tensor {tensor[:200]} names a shard outside the checkpoint directory")
        elif (self.path / SINGLE_NAME).is_file():
            single = check_link(self.path, self.path / SINGLE_NAME)
            self.weight_map = {name: SINGLE_NAME for name in read_header(single)[0] if name != "__metadata__"}
        else:
            raise InputError(f"{self.path} has no {INDEX_NAME} (nor a single {SINGLE_NAME})")
        self._headers: dict[str, dict[str, TensorInfo]] = {}

    @property
    def shard_names(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shard_path(self, name: str) -> Path:
        """A shard the index names, checked against the symlink rule (check_link)."""
        return check_link(self.path, self.path / name)

    def shard(self, name: str) -> dict[str, TensorInfo]:
        if name not in self._headers:
            path = self.shard_path(name)
            if not path.is_file():
                raise InputError(f"shard {path} named by the index does not exist")
            self._headers[name] = header_tensors(path)
        return self._headers[name]

    def info(self, tensor: str) -> TensorInfo:
        try:
            shard = self.weight_map[tensor]
        except KeyError:
            raise InputError(f"tensor {tensor} is not in {self.path / INDEX_NAME}") from None
        try:
            return self.shard(shard)[tensor]
        except KeyError:
            raise InputError(f"tensor {tensor}: the index names shard {shard}, whose header lacks it") from None

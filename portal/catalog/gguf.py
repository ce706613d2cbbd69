"""The key-value metadata at the start of a GGUF file (architecture, name, chat template), without loading tensors
(portal/engines/llama_cpp.py reads it for the chat format a file needs).

Layout (GGUF v2/v3, little-endian): b"GGUF", u32 version, u64 tensor count, u64 key-value count, then each pair:
a string key (u64 length + UTF-8), a u32 value type and the value. Arrays (token lists of 100k+ strings) are
skipped, not kept: only their length is reported.

Also the GGUF files of a folder grouped into models (a split model's parts together) and the one a launch loads.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import BinaryIO, Dict, List, Union

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_STRING = 16 * 1024 * 1024  # a chat template is a few KB; anything near this is a broken file
MAX_PAIRS = 100_000

Value = Union[int, float, bool, str, "ArrayInfo"]


class GGUFError(ValueError):
    """Not a GGUF file, or a broken one."""


class ArrayInfo:
    """An array value that was skipped: its element type and length."""

    def __init__(self, item_type: int, length: int):
        self.item_type, self.length = item_type, length

    def __repr__(self) -> str:
        return f"<array of {self.length}>"


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise GGUFError("the file ends inside its metadata")
    return data


def _string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(handle, 8))
    if length > MAX_STRING:
        raise GGUFError(f"a metadata string of {length} bytes")
    return _read(handle, length).decode("utf-8", errors="replace")


def _skip(handle: BinaryIO, value_type: int, count: int) -> None:
    if value_type == STRING:
        for _ in range(count):
            (length,) = struct.unpack("<Q", _read(handle, 8))
            handle.seek(length, 1)
    elif value_type in SCALARS:
        handle.seek(struct.calcsize(SCALARS[value_type]) * count, 1)
    elif value_type == ARRAY:
        for _ in range(count):
            item_type, length = struct.unpack("<IQ", _read(handle, 12))
            _skip(handle, item_type, length)
    else:
        raise GGUFError(f"unknown metadata value type {value_type}")


def _value(handle: BinaryIO, value_type: int) -> Value:
    if value_type == STRING:
        return _string(handle)
    if value_type in SCALARS:
        fmt = SCALARS[value_type]
        return struct.unpack(fmt, _read(handle, struct.calcsize(fmt)))[0]
    if value_type == ARRAY:
        item_type, length = struct.unpack("<IQ", _read(handle, 12))
        _skip(handle, item_type, length)
        return ArrayInfo(item_type, length)
    raise GGUFError(f"unknown metadata value type {value_type}")


def read_metadata(path: Path) -> Dict[str, Value]:
    """All metadata pairs of a GGUF file (arrays as ArrayInfo). Raises GGUFError for anything else."""
    with open(path, "rb") as handle:
        if _read(handle, 4) != b"GGUF":
            raise GGUFError(f"{path.name} is not a GGUF file")
        version, _tensors, pairs = struct.unpack("<IQQ", _read(handle, 20))
        if version not in (2, 3):
            raise GGUFError(f"{path.name}: GGUF version {version} is not supported")
        if pairs > MAX_PAIRS:
            raise GGUFError(f"{path.name}: {pairs} metadata pairs")
        out: Dict[str, Value] = {}
        for _ in range(pairs):
            key = _string(handle)
            (value_type,) = struct.unpack("<I", _read(handle, 4))
            out[key] = _value(handle, value_type)
        return out


GGUF_SPLIT = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.gguf$")
GGUF_PREFERRED = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0")  # the usual default quantizations, best first


def gguf_variants(files: List[Path]) -> Dict[str, List[Path]]:
    """GGUF files grouped into models: name -> files (a split model's parts in order, its first part first)."""
    groups: Dict[str, List[Path]] = {}
    for path in sorted(files):
        match = GGUF_SPLIT.fullmatch(path.name)
        groups.setdefault(match["stem"] if match else path.name[:-len(".gguf")], []).append(path)
    return groups


def choose_gguf(variants: Dict[str, List[Path]]) -> str:
    """The variant a launch loads: a usual default quantization when there is one, else the first by name."""
    for preferred in GGUF_PREFERRED:
        for name in sorted(variants):
            if preferred.lower() in name.lower():
                return name
    return sorted(variants)[0]

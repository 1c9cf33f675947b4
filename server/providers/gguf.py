"""Scalar metadata from a GGUF file's header, read without loading the model.

``--llm local`` starts its child with the model's trained context, which a GGUF states
as ``<arch>.context_length`` (``general.architecture`` names ``arch``; SmolLM2's is
``llama.context_length`` = 8192). The format (GGUF v2 and v3, the ggml project's
``docs/gguf.md``): the magic ``GGUF``, a ``uint32`` version, ``uint64`` tensor and
key-value counts, then the key-value pairs, each a string key (``uint64`` length and
UTF-8 bytes), a ``uint32`` value type and the value; all little-endian (big-endian
files exist and are detected by their version).

Why not the ``gguf`` package: its ``GGUFReader`` maps the whole file and builds an array
for every field and tensor, the 49,152 vocabulary strings included: 3.8 s for the 98 MB
SmolLM2 file on this project's 2-core machine, at every start, where this reader stops at
the keys it was asked for (0.2 ms for SmolLM2's context length; 0.1 s for its whole
header). ``tests/test_context.py``
checks the two agree where ``gguf`` is installed.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO, Final

__all__ = ["GGUFError", "read_metadata", "trained_context"]

_SCALARS: Final = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING: Final = 8
_ARRAY: Final = 9
_MAX_STRING: Final = 1 << 26
"""Longest string accepted (bytes): a longer length is a corrupt file, not a key."""


class GGUFError(ValueError):
    """Not a GGUF file this reader understands (v2 or v3), or a truncated one."""


class _Reader:
    def __init__(self, file: BinaryIO, order: str) -> None:
        self.file = file
        self.order = order

    def unpack(self, code: str) -> Any:
        size = struct.calcsize(code)
        data = self.file.read(size)
        if len(data) != size:
            raise GGUFError("the GGUF header is truncated")
        return struct.unpack(self.order + code, data)[0]

    def string(self) -> str:
        length = self.unpack("Q")
        if length > _MAX_STRING:
            raise GGUFError("a GGUF string is implausibly long: the file is corrupt")
        data = self.file.read(length)
        if len(data) != length:
            raise GGUFError("the GGUF header is truncated")
        return data.decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        raise GGUFError(f"unknown GGUF value type {kind}")

    def skip_array(self) -> None:
        kind, count = self.unpack("I"), self.unpack("Q")
        if kind in _SCALARS:
            self.file.seek(count * struct.calcsize(_SCALARS[kind]), 1)
        elif kind == _STRING:
            for _ in range(count):
                length = self.unpack("Q")
                if length > _MAX_STRING:
                    raise GGUFError("a GGUF string is implausibly long: the file is corrupt")
                self.file.seek(length, 1)
        elif kind == _ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            raise GGUFError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path, keys: Collection[str] | None = None) -> dict[str, Any]:
    """The header's scalar and string values by key (arrays are skipped).

    :param keys: stop once all of these are read (``None``: read the whole header).
    :raises GGUFError: not a GGUF v2/v3 file, or truncated.
    :raises OSError: the file cannot be read.
    """
    found: dict[str, Any] = {}
    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise GGUFError("not a GGUF file")
        raw = file.read(4)
        if len(raw) != 4:
            raise GGUFError("the GGUF header is truncated")
        order = "<" if struct.unpack("<I", raw)[0] < 0x10000 else ">"
        version = struct.unpack(order + "I", raw)[0]
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
        reader = _Reader(file, order)
        reader.unpack("Q")  # tensor count
        for _ in range(reader.unpack("Q")):
            key = reader.string()
            kind = reader.unpack("I")
            if kind == _ARRAY:
                reader.skip_array()
                continue
            found[key] = reader.value(kind)
            if keys is not None and all(k in found for k in keys):
                break
    return found


def trained_context(path: Path) -> int | None:
    """``<general.architecture>.context_length``: the context, in tokens, the model was
    trained with; ``None`` when the header does not say.

    :raises GGUFError: not a GGUF v2/v3 file, or truncated.
    :raises OSError: the file cannot be read.
    """
    arch = read_metadata(path, ["general.architecture"]).get("general.architecture")
    if not isinstance(arch, str):
        return None
    key = f"{arch}.context_length"
    value = read_metadata(path, [key]).get(key)
    return int(value) if isinstance(value, int) and value > 0 else None

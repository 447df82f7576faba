"""GGUF files: read once, checked before anything loads, every tensor type the `gguf` package dequantises.

transformers reads a GGUF file several times over for one model (its config, its tokenizer, its weights, each
through `gguf.GGUFReader`, which walks the vocabulary item by item through numpy views: SmolLM2-135M took 26.8 s
to load, most of it parsing). Here the file is parsed once, by `GgufFile.parse` (struct reads on an mmap: the
metadata and the tensor table, no tensor data), and `reading(file)` hands that parse to transformers wherever it
would parse again while a model loads: its readers get this file's parse, its metadata readers and the
`load_gguf_checkpoint(return_tensors=False)` step are answered from a memo, and gguf-py's tensor-name map (built
once per module of the model, hundreds of times) is built once. transformers still does the mapping (config,
tokenizer, tensor names, the per-architecture reverse transforms), so the model is exactly what its own
`from_pretrained(…, gguf_file=…)` gives.

Tensor types: the architectures transformers reads through its legacy reader (Llama, Qwen, Gemma, GPT-2, …)
dequantise with `gguf.dequantize`, which knows every type llama.cpp writes, including the Q5_0 / Q5_1 / Q8_0 that
its K-quant mixes fall back to for rows that are not a multiple of 256. The few architectures transformers reads
with its own block reader (`transformers.integrations.gguf`, which knows fewer types) go through the legacy reader
instead when the file holds a type that reader lacks and the legacy one covers the architecture.

Checks before loading, each naming the real cause: a file that ends before its tensor table says its data does
is the only one called incomplete; a tensor type gguf cannot dequantise names the type; an architecture
transformers cannot read from GGUF names it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import mmap
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WorkbenchError

# GGUF metadata value types (gguf.GGUFValueType): fixed-size ones as struct formats; 8 is a string, 9 an array
_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class Truncated(Exception):
    """The file ends inside its header."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type_id: int
    dims: tuple[int, ...]  # ggml order: fastest-moving first
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) if self.dims else 1

    @property
    def n_bytes(self) -> int:
        """Its bytes in the file (a known type: the file's parse refuses unknown ones first)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.type_id)]
        return self.n_elements // block * size


@dataclass
class GgufFile:
    """A GGUF file's metadata and tensor table, parsed once; its tensor data stays on disk (mmap)."""

    path: Path
    size: int
    version: int
    metadata: dict[str, tuple[list[int], Any]]  # key -> (value types, value): [8] str, [9, 8] list of str, …
    tensors: list[TensorEntry]
    data_start: int
    _mm: mmap.mmap | None = field(default=None, repr=False)

    # -- parsing ----------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, path: str | Path) -> GgufFile:
        """Parse the header; refuse a file that is not GGUF, that ends inside its header, or whose tensors reach
        past its end (each called what it is), before any tensor is read."""
        path = Path(path)
        size = path.stat().st_size
        with path.open("rb") as f:
            if size == 0:
                raise WorkbenchError(f"{path.name} is empty (0 bytes): the file is incomplete.",
                                     hint="Download or convert it again.")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writes (none expected) stay private
        try:
            if mm[:4] != b"GGUF":
                raise WorkbenchError(f"{path.name} is not a GGUF file (it does not start with 'GGUF').")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
            if version not in (2, 3):
                raise WorkbenchError(f"{path.name} is GGUF version {version}; versions 2 and 3 can be read.",
                                     hint="Convert it again with a current llama.cpp.")
            pos, metadata = 24, {}
            for _ in range(n_kv):
                key, pos = _string(mm, pos)
                (vtype,) = struct.unpack_from("<I", mm, pos)
                metadata[key], pos = _value(mm, pos + 4, vtype)
            tensors = []
            for _ in range(n_tensors):
                name, pos = _string(mm, pos)
                (n_dims,) = struct.unpack_from("<I", mm, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
                pos += 4 + 8 * n_dims
                type_id, offset = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                tensors.append(TensorEntry(name, int(type_id), tuple(int(d) for d in dims), int(offset)))
        except (struct.error, Truncated, UnicodeDecodeError, IndexError) as e:
            mm.close()
            if isinstance(e, UnicodeDecodeError):
                raise WorkbenchError(f"{path.name} has a GGUF header that does not decode ({e}).",
                                     hint="The file is damaged: download or convert it again.") from e
            raise WorkbenchError(f"The GGUF file {path.name} is incomplete: it ends inside its header "
                                 f"({size:,} bytes).",
                                 hint="The download or conversion was cut short: fetch or convert it again.") from e
        except WorkbenchError:
            mm.close()
            raise
        alignment = int(metadata.get("general.alignment", ([4], 32))[1])
        data_start = (pos + alignment - 1) // alignment * alignment
        out = cls(path, size, int(version), metadata, tensors, data_start, mm)
        out._check_extents()
        return out

    def _check_extents(self) -> None:
        """A tensor whose bytes reach past the file's end means the file was cut short: the only case called
        incomplete. Unknown type ids are refused by name here too (their size is unknown)."""
        from gguf import GGMLQuantizationType

        end = self.data_start
        for t in self.tensors:
            if t.type_id not in GGMLQuantizationType._value2member_map_:
                self.close()
                raise WorkbenchError(
                    f"{self.path.name} stores tensor {t.name!r} as ggml type {t.type_id}, a type the gguf package "
                    f"{_gguf_version()} does not know.",
                    hint=f"Types that load: {', '.join(readable_types())}. Convert the file to one of them "
                         "(llama.cpp's llama-quantize), or update the gguf package if llama.cpp added a new type.")
            end = max(end, self.data_start + t.offset + t.n_bytes)
        if end > self.size:
            self.close()
            raise WorkbenchError(
                f"The GGUF file {self.path.name} is incomplete: its tensor table says its data runs to byte {end:,}, "
                f"and the file has {self.size:,} bytes.",
                hint="The download or conversion was cut short: fetch or convert it again.")

    # -- what it holds -----------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ([STRING], ""))[1])

    def value(self, key: str, default=None):
        return self.metadata[key][1] if key in self.metadata else default

    def type_names(self) -> dict[str, str]:
        """{tensor name: ggml type name}."""
        from gguf import GGMLQuantizationType

        return {t.name: GGMLQuantizationType(t.type_id).name for t in self.tensors}

    def check_types(self) -> None:
        """Refuse a tensor type the gguf package cannot dequantise, naming it and what can be read."""
        bad = sorted({name for name in self.type_names().values() if name not in readable_types()})
        if bad:
            where = [n for n, t in self.type_names().items() if t in bad][:3]
            raise WorkbenchError(
                f"{self.path.name} stores tensors as {', '.join(bad)} (e.g. {', '.join(where)}), which the gguf "
                f"package {_gguf_version()} cannot dequantise.",
                hint=f"Types that load: {', '.join(readable_types())}. Convert the file to one of them "
                     "(llama.cpp's llama-quantize).")

    def close(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # arrays that still view it keep it open until collected
                self._mm.close()
            self._mm = None

    # -- what gguf.GGUFReader gives, for transformers' readers -------------------------------------------------
    def reader(self) -> _Reader:
        return _Reader(self)

    def tensor_data(self, t: TensorEntry) -> np.ndarray:
        """The tensor's bytes as gguf.GGUFReader shapes them (values for plain types, uint8 rows of blocks for
        the rest), viewing the file."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(t.type_id)
        shape = tuple(reversed(t.dims))
        plain = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}
        start = self.data_start + t.offset
        if qtype.name in plain:
            return np.frombuffer(self._mm, dtype=plain[qtype.name], count=t.n_elements, offset=start).reshape(shape)
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=start).reshape(
            quant_shape_to_byte_shape(shape, qtype))

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor's values (float32, torch order), as gguf.quants.dequantize gives them."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = next(t for t in self.tensors if t.name == name)
        return dequantize(self.tensor_data(t), GGMLQuantizationType(t.type_id))


def _string(mm, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", mm, pos)
    end = pos + 8 + n
    if end > len(mm):
        raise Truncated
    return mm[pos + 8:end].decode("utf-8"), end


def _value(mm, pos: int, vtype: int) -> tuple[tuple[list[int], Any], int]:
    if vtype in _FORMAT:
        (v,) = struct.unpack_from(_FORMAT[vtype], mm, pos)
        return ([vtype], v), pos + struct.calcsize(_FORMAT[vtype])
    if vtype == STRING:
        s, pos = _string(mm, pos)
        return ([STRING], s), pos
    if vtype == ARRAY:
        etype, count = struct.unpack_from("<IQ", mm, pos)
        pos += 12
        if etype in _NUMPY:
            width = np.dtype(_NUMPY[etype]).itemsize
            if pos + count * width > len(mm):
                raise Truncated
            values = np.frombuffer(mm, dtype=_NUMPY[etype], count=count, offset=pos).tolist()
            return ([ARRAY, etype], values), pos + count * width
        if etype == STRING:
            out = []
            for _ in range(count):
                s, pos = _string(mm, pos)
                out.append(s)
            return ([ARRAY, STRING], out), pos
        raise WorkbenchError(f"GGUF metadata holds an array of value type {etype}, which cannot be read.")
    raise WorkbenchError(f"GGUF metadata holds a value of type {vtype}, which cannot be read.")


class _Field:
    """gguf.ReaderField as transformers reads it: `parts[i] for i in data`, each part indexable by [0] (numbers)
    or a byte string (strings), with `types`."""

    def __init__(self, name: str, types: list[int], value):
        self.name, self.types = name, list(types)
        if types[0] == ARRAY:
            self.parts = [v.encode("utf-8") for v in value] if types[1] == STRING else [(v,) for v in value]
            self.data = list(range(len(self.parts)))
        else:
            self.parts = [value.encode("utf-8") if types[0] == STRING else (value,)]
            self.data = [0]


class _Tensor:
    def __init__(self, file: GgufFile, t: TensorEntry):
        from gguf import GGMLQuantizationType

        self._file, self._entry = file, t
        self.name, self.tensor_type = t.name, GGMLQuantizationType(t.type_id)
        self.shape = np.array(t.dims, dtype=np.uint64)
        self.n_elements, self.n_bytes = t.n_elements, t.n_bytes
        self.data_offset = file.data_start + t.offset
        self.field = None

    @property
    def data(self) -> np.ndarray:
        return self._file.tensor_data(self._entry)


class _Reader:
    """The parts of gguf.GGUFReader that transformers' GGUF loading reads (`fields`, `tensors`), from one parse."""

    def __init__(self, file: GgufFile):
        self.fields = {k: _Field(k, types, v) for k, (types, v) in file.metadata.items()}
        self.tensors = [_Tensor(file, t) for t in file.tensors]


def readable_types() -> list[str]:
    """The ggml tensor types that load: what gguf.quants.dequantize reads (F32, F16, and every type it has traits
    for: BF16 and the block types; not F64 or the integer types)."""
    from gguf.quants import _type_traits

    return ["F32", "F16", "BF16", *sorted(q.name for q in _type_traits if q.name != "BF16")]


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def gguf_architectures() -> list[str]:
    """The GGUF architectures transformers can load (its legacy reader's and its block reader's)."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    legacy = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    return legacy + [a for a in GGUF_ARCHS if a not in legacy]


# llama.cpp's architecture names that transformers' legacy reader renames to its own (load_gguf_checkpoint)
RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def check_architecture(file: GgufFile) -> None:
    arch = file.architecture
    if arch in gguf_architectures() or RENAMED.get(arch) in gguf_architectures():
        return
    raise WorkbenchError(f"{file.path.name} is a GGUF file of architecture {arch!r}, which transformers "
                         "cannot load from GGUF (the file itself is complete).",
                         hint=f"GGUF architectures it can read: {', '.join(gguf_architectures())}.")


_LOCK = threading.RLock()  # the patches below are process-wide: one GGUF load at a time


@contextlib.contextmanager
def reading(file: GgufFile):
    """While a model loads from `file`, transformers' GGUF readers get this file's one parse (see the module
    docstring); other files are read as transformers reads them."""
    import gguf
    import transformers.integrations.gguf as tgguf
    import transformers.integrations.gguf.reader as treader
    import transformers.integrations.gguf.utils as tutils
    import transformers.modeling_gguf_pytorch_utils as legacy
    import transformers.quantizers.quantizer_gguf as quantizer

    target = str(file.path.resolve())

    def ours(path) -> bool:
        try:
            return str(Path(path).resolve()) == target
        except (TypeError, OSError):
            return False

    real_reader, real_checkpoint = gguf.GGUFReader, legacy.load_gguf_checkpoint
    real_metadata, real_names, real_supported = treader.read_gguf_metadata, gguf.get_tensor_name_map, \
        tutils.is_gguf_arch_supported
    memo: dict = {}

    def reader(path, *args, **kwargs):
        return file.reader() if ours(path) else real_reader(path, *args, **kwargs)

    def checkpoint(path, return_tensors=False, *args, **kwargs):
        if return_tensors or not ours(path):
            return real_checkpoint(path, return_tensors, *args, **kwargs)
        if "checkpoint" not in memo:
            memo["checkpoint"] = real_checkpoint(path, False)
        return copy.deepcopy(memo["checkpoint"])  # callers edit what they get

    def metadata(path, string_arrays=()):
        if not ours(path):
            return real_metadata(path, string_arrays)
        key = ("metadata", tuple(sorted(string_arrays)))
        if key not in memo:
            memo[key] = real_metadata(path, string_arrays)
        return copy.deepcopy(memo[key])

    names = functools.lru_cache(maxsize=None)(real_names)
    types = set(file.type_names().values())

    def supported(arch: str) -> bool:
        """transformers' block reader for an architecture it has one for, unless this file holds a type only the
        legacy reader (gguf.dequantize) can read and the legacy reader covers the architecture."""
        from transformers.integrations.gguf.dequant import GGML_NAME

        if not real_supported(arch):
            return False
        blocks_lack = types - set(GGML_NAME.values()) - {"F32", "F16", "BF16"}
        return not (blocks_lack and arch in legacy.GGUF_SUPPORTED_ARCHITECTURES)

    with _LOCK:
        patches = [(gguf, "GGUFReader", reader), (legacy, "load_gguf_checkpoint", checkpoint),
                   (treader, "read_gguf_metadata", metadata), (tgguf, "read_gguf_metadata", metadata),
                   (quantizer, "read_gguf_metadata", metadata), (gguf, "get_tensor_name_map", names),
                   (tutils, "is_gguf_arch_supported", supported), (tgguf, "is_gguf_arch_supported", supported),
                   (quantizer, "is_gguf_arch_supported", supported)]
        saved = [(mod, name, mod.__dict__.get(name, getattr(mod, name))) for mod, name, _ in patches]
        try:
            for mod, name, new in patches:
                setattr(mod, name, new)
            yield file
        finally:
            for mod, name, old in saved:
                setattr(mod, name, old)

"""Weight files as name -> NumPy array mappings: safetensors memory-mapped, PyTorch pickles via the safe loader.

safetensors layout: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__": {str: str}}),
then the data buffer the offsets point into. Tensors are views of one read-only np.memmap, so opening
a multi-GB file reads only its header; pages are read when a tensor is used.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from .errors import ModelInputError

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Largest header the safetensors library accepts; a bigger length field means a corrupt file.
MAX_HEADER_BYTES = 100_000_000

# Per diffusers component folder, in order of preference: single files, then sharded indexes.
COMPONENT_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json",
)


class SafetensorsFile(Mapping[str, np.ndarray]):
    """The tensors of one .safetensors file; `metadata` is its `__metadata__` dict.

    The header is checked as strictly as the safetensors library checks it: a header of at most
    MAX_HEADER_BYTES that is a JSON object (starting with '{', no repeated names), string-to-string
    metadata, known dtypes, shapes whose byte size matches the offsets (and does not overflow), and
    offsets that tile the data buffer exactly: in order, no overlap, no gap, nothing past the end."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise self._error(f"is {size} bytes long, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise self._error(f"declares a {header_len}-byte header, more than the {MAX_HEADER_BYTES} bytes "
                                  "safetensors allows (corrupt or not a safetensors file)")
            if header_len > size - 8:
                raise self._error(f"declares a {header_len}-byte header but the file is {size} bytes "
                                  "(truncated or not a safetensors file)")
            raw = handle.read(header_len)
        header = self._parse_header(raw)
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise self._error("has a __metadata__ that is not a map of strings to strings (corrupt header)")
        self.metadata = dict(metadata or {})
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries = {name: self._entry(name, info) for name, info in header.items()}
        self._check_tiling(data_len)
        # np.memmap refuses empty maps, and a file of only empty tensors has nothing to map.
        self._buffer = (np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start, shape=(data_len,))
                        if data_len else np.zeros(0, np.uint8))

    def _error(self, problem: str) -> ModelInputError:
        return ModelInputError(f"{self.path} {problem}; re-download or re-export the file")

    def _parse_header(self, raw: bytes) -> dict:
        if not raw.startswith(b"{"):
            raise self._error("has a header that does not start with '{' (corrupt or not a safetensors file)")

        def unique(pairs: list[tuple[str, object]]) -> dict:
            names = [name for name, _ in pairs]
            if len(set(names)) != len(names):
                repeated = sorted({n for n in names if names.count(n) > 1})
                raise self._error(f"names {repeated[:3]} more than once in its header (corrupt header)")
            return dict(pairs)

        try:
            return json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
        except RecursionError:
            raise self._error("has a header nested too deeply to parse (corrupt header)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._error(f"has a header that is not valid JSON ({err}) (corrupt file)") from None

    def _entry(self, name: str, info: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            begin, end = offsets
        except (TypeError, KeyError, ValueError) as err:
            raise self._error(f"has a malformed header entry for tensor {name!r}: {str(info)[:200]}") from err
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise self._error(f"stores tensor {name!r} as {dtype_name}, which is not supported "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        if not (isinstance(shape, list) and isinstance(offsets, list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (*shape, begin, end))):
            raise self._error(f"has a malformed header entry for tensor {name!r}: {str(info)[:200]}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        count = math.prod(shape)
        if count * dtype.itemsize >= 2**64:
            raise self._error(f"gives tensor {name!r} a shape {shape} whose size overflows (corrupt header)")
        if end < begin or end - begin != count * dtype.itemsize:
            raise self._error(f"gives tensor {name!r} of shape {list(shape)} {dtype_name} bytes {begin}..{end} "
                              "(corrupt header)")
        return dtype, tuple(shape), begin, end

    def _check_tiling(self, data_len: int) -> None:
        """The tensors' byte ranges cover the data buffer exactly, in order, as the library requires."""
        position = 0
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if begin != position:
                problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
                raise self._error(f"puts tensor {name!r} at bytes {begin}..{end}, which {problem} (corrupt header)")
            position = end
        if position != data_len:
            raise self._error(f"has {data_len} bytes of tensor data but its header accounts for {position} "
                              "(a truncated file, or data past the last tensor)")

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        return self._buffer[begin:end].view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _torch_to_numpy(name: str, tensor, path: Path) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # NumPy has no bfloat16; reinterpret the same bits as ml_dtypes' bfloat16, still without a copy.
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        return tensor.numpy()
    except TypeError as err:
        raise ModelInputError(f"{path} stores tensor {name!r} as {tensor.dtype}, which NumPy cannot hold; "
                              "convert the file to float32/float16 safetensors") from err


def _load_pickle(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        # Only the zip format (PyTorch >= 1.6) can be memory-mapped; older files load into memory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        culprit = next((line.strip().split(" was not")[0] for line in str(err).splitlines()
                        if "Unsupported global" in line), "")
        raise ModelInputError(f"{path} contains non-tensor Python objects, and is refused for safety: loading "
                              "them would run code from the file. Convert it to .safetensors with a tool you "
                              f"trust. {culprit}".rstrip()) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelInputError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(err).__name__}: {err}") from err
    # Training checkpoints (.ckpt from PyTorch Lightning) nest the weights under "state_dict".
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelInputError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    tensors = {name: _torch_to_numpy(name, value, path) for name, value in state.items()
               if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelInputError(f"{path} holds no tensors (keys: {list(state)[:10]})")
    return tensors


def open_tensor_file(path: str | Path) -> Mapping[str, np.ndarray]:
    """The tensors of a .safetensors (memory-mapped) or .bin/.ckpt/.pt/.pth (weights-only torch.load) file."""
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise ModelInputError(f"{path}: unknown weight file type {path.suffix!r}; "
                          f"expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")


def component_weight_files(folder: str | Path) -> list[Path]:
    """The weight file of a diffusers component folder (unet/, vae/, text_encoder/), or its shards."""
    folder = Path(folder)
    for name in COMPONENT_WEIGHT_FILES:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if not name.endswith(".index.json"):
            return [candidate]
        try:
            weight_map = json.loads(candidate.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelInputError(f"{candidate} is not a shard index (no weight_map): {err}") from err
        shards = [folder / shard for shard in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise ModelInputError(f"{candidate} lists shards that are missing: {', '.join(missing)}")
        return shards
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    raise ModelInputError(f"no weight file in {folder}: expected one of {', '.join(COMPONENT_WEIGHT_FILES)}; "
                          + (f"found {present}" if present is not None else "the folder does not exist"))


def open_component(folder: str | Path) -> Mapping[str, np.ndarray]:
    """All tensors of a diffusers component folder, shards merged."""
    tensors: dict[str, np.ndarray] = {}
    for path in component_weight_files(folder):
        shard = open_tensor_file(path)
        repeated = tensors.keys() & shard.keys()
        if repeated:
            raise ModelInputError(f"{path} repeats tensors of an earlier shard: {sorted(repeated)[:5]}")
        tensors.update((name, shard[name]) for name in shard)
    return tensors


def write_checkpoint(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write a PyTorch checkpoint `{"state_dict": {name: tensor}}`, as original SD single files are.

    Only tensors in plain dicts are pickled, so `torch.load(path, weights_only=True)` (and every loader
    that refuses arbitrary objects) reads it. Tensors share the arrays' memory (memory-mapped sources
    are not copied); the file is written under a temporary name and renamed at the end."""
    import warnings

    try:
        import torch
    except ImportError as err:
        raise ModelInputError(f"{path}: writing .ckpt needs PyTorch; install torch or write .safetensors") from err
    state = {}
    with warnings.catch_warnings():  # read-only memory maps: torch warns, and only reads them
        warnings.simplefilter("ignore", UserWarning)
        for name, array in tensors.items():
            array = np.ascontiguousarray(array)
            if array.dtype == ml_dtypes.bfloat16:
                state[name] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            else:
                state[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("<"), copy=False))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"state_dict": state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the given order, one at a time, so a multi-GB model never sits in memory twice."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in tensors.items():
        dtype_name = _DTYPE_NAMES.get(array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype)
        if dtype_name is None:
            raise ModelInputError(f"tensor {name!r} has dtype {array.dtype}, which safetensors files here cannot "
                                  f"hold (supported: {', '.join(SAFETENSORS_DTYPES)})")
        header[name] = {"dtype": dtype_name, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format's convention: data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for array in tensors.values():
                if array.dtype.byteorder == ">":
                    array = array.astype(array.dtype.newbyteorder("<"))
                handle.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

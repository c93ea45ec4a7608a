"""Safe, streaming checkpoint reading and writing for `internvl-chat convert` / `export`.

    from internvl_chat.hub.checkpoint_io import ShardedWriter, iter_tensors, weight_files

    writer = ShardedWriter("out", max_shard_size="5GB", dtype=torch.bfloat16)
    for path in weight_files("llava-v1.5-7b"):           # shards in index order; a missing shard is an error
        for name, tensor in iter_tensors(path):           # one tensor at a time (safetensors) / mmap (.bin)
            writer.add(rename(name), tensor)
    writer.close()                                         # model-0000i-of-0000N.safetensors + index

Rules (the safety half of issue 3):
* `.safetensors` files are read lazily, tensor by tensor; a truncated or corrupt file raises `CheckpointError`
  naming the file.
* `.bin` files are read only with `torch.load(weights_only=True)` (memory-mapped when the file is a zip archive);
  a pickle that holds anything but tensors is refused with an error naming the file.
* Anything else (`.pt`, `.pth`, `.ckpt`, `.pkl`, `.h5`, ...) is refused.
* Output is always safetensors, written by `ShardedWriter` tensor by tensor straight from the tensor's memory (no
  serialised copy of a whole shard), with `model.safetensors.index.json` when there is more than one shard.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
# Suffixes that hold pickles or formats we never execute / read.
REFUSED_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".npz", ".joblib")

# safetensors dtype names (the format's spec) for the torch dtypes a model checkpoint holds.
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _ST_DTYPES[torch.float8_e4m3fn] = "F8_E4M3"
    _ST_DTYPES[torch.float8_e5m2] = "F8_E5M2"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or does not match the expected layout."""


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 → bytes (decimal units as transformers' `max_shard_size`)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if match is None:
        raise ValueError(f"Cannot parse size {size!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes.")
    number, unit = float(match.group(1)), match.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


def _check_suffix(path: Path) -> None:
    if path.name.endswith(".safetensors") or path.name.endswith(".bin"):
        return
    raise CheckpointError(
        f"Refusing to read {path}: only .safetensors and .bin (loaded with torch.load(weights_only=True)) weight "
        "files are read; convert other formats to safetensors first."
    )


def _index_shards(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"Cannot read the shard index {index_path}: {err}") from err
    shards = list(dict.fromkeys(weight_map.values()))  # index order, deduplicated
    missing = [name for name in shards if not (index_path.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"Missing shard(s) {', '.join(missing)} listed in {index_path}.")
    return [index_path.parent / name for name in shards]


def weight_files(folder: str | Path, required: bool = True) -> list[Path]:
    """The weight files of a model folder, in shard order; safetensors preferred over `.bin` when both exist.

    Raises `CheckpointError` naming the file for a missing shard, and when the folder only holds refused formats.
    """
    folder = Path(folder)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            files = _index_shards(folder / index_name)
            for path in files:
                _check_suffix(path)
            return files
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if files:
        return files
    refused = sorted(p.name for p in folder.glob("*") if p.suffix in REFUSED_SUFFIXES)
    if refused:
        raise CheckpointError(
            f"Refusing to read {folder / refused[0]}: only .safetensors and .bin (weights_only) weight files are "
            f"read (found {', '.join(refused)})."
        )
    if required:
        raise CheckpointError(f"No weight files (*.safetensors, pytorch_model*.bin) in {folder}.")
    return []


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError, OSError: the library has no common public base class
        raise CheckpointError(f"Cannot read {path}: not a valid safetensors file ({err}).") from err


def _load_bin(path: Path) -> dict:
    try:
        try:
            # mmap keeps the shard out of anonymous memory: tensors are paged in as they are written out.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickles
    except pickle.UnpicklingError as err:
        # [IMPORTANT] weights_only=True refuses any global that is not a tensor / container type; surface the
        # file name instead of torch's generic message, and never retry with weights_only=False.
        raise CheckpointError(
            f"Refusing to load {path}: it is a pickle holding objects other than tensors (torch.load with "
            f"weights_only=True rejected it: {str(err).splitlines()[0]})."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"Refusing {path}: expected a dict of tensors, found {type(state).__name__}.")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"Refusing {path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}.")
    return state


def tensor_names(path: str | Path) -> list[str]:
    """Names in one weight file (reads only the header of a safetensors file; a `.bin` is loaded with mmap)."""
    path = Path(path)
    _check_suffix(path)
    if path.name.endswith(".safetensors"):
        with _open_safetensors(path) as handle:
            return list(handle.keys())
    return list(_load_bin(path))


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) from one weight file, one tensor at a time."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise CheckpointError(f"Missing weight file {path}.")
    if path.name.endswith(".safetensors"):
        with _open_safetensors(path) as handle:
            for name in list(handle.keys()):
                try:
                    tensor = handle.get_tensor(name)
                except Exception as err:
                    raise CheckpointError(f"Cannot read tensor {name!r} from {path}: {err}") from err
                yield name, tensor
        return
    state = _load_bin(path)
    for name in list(state):
        yield name, state.pop(name)  # drop our reference as we go


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one (small) weight file: a projector, an adapter, non-LoRA trainables."""
    return dict(iter_tensors(path))


def folder_tensors(folder: str | Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) over every weight file of a folder, shard by shard."""
    for path in weight_files(folder):
        for name, tensor in iter_tensors(path):
            yield path, name, tensor


def folder_tensor_names(folder: str | Path) -> list[str] | None:
    """Names of all tensors of a folder without loading data, or None when only pickles could tell."""
    folder = Path(folder)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            try:
                return list(json.loads((folder / index_name).read_text())["weight_map"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"Cannot read the shard index {folder / index_name}: {err}") from err
    files = weight_files(folder, required=False)
    if files and all(p.name.endswith(".safetensors") for p in files):
        return [name for p in files for name in tensor_names(p)]
    return None


class ShardedWriter:
    """Writes tensors into safetensors shards of at most `max_shard_size` bytes (a bigger tensor gets its own).

    Tensors are buffered until the shard is full, then the shard is written tensor by tensor from the tensors' own
    memory. `close()` names the shards `model-0000i-of-0000N.safetensors` (or `model.safetensors` when there is one)
    and writes `model.safetensors.index.json`. Peak memory is about one shard plus one tensor.
    """

    def __init__(self, folder: str | Path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = parse_size(max_shard_size)
        self.dtype = dtype
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0
        self.names: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise CheckpointError(f"Tensor {name!r} written twice (two source keys map onto it).")
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        self.names[name] = (tuple(tensor.shape), tensor.dtype)

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f"shard-{len(self._shards):05d}.safetensors.partial"
        write_safetensors(path, self._buffer, metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self.total_size += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Writes the last shard and the index; returns the shard paths."""
        self._flush()
        count = len(self._shards)
        final = []
        weight_map = {}
        for i, (path, names) in enumerate(self._shards):
            name = SAFE_SINGLE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / name)
            final.append(self.folder / name)
            weight_map.update({n: name for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return final

    def abort(self) -> None:
        for path, _ in self._shards:
            path.unlink(missing_ok=True)
        self._buffer.clear()


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Writes a safetensors file tensor by tensor (the format: u64 header length, JSON header, raw data).

    `safetensors.torch.save_file` first copies every tensor into a bytes object; for multi-GB shards that doubles
    the memory of the conversion, so the (simple, documented) format is written here directly.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _ST_DTYPES:
            raise CheckpointError(f"Tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # [IMPORTANT] the header is padded with spaces to a multiple of 8 bytes so the data starts aligned.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for tensor in tensors.values():
            if tensor.numel() == 0:
                continue
            # Raw little-endian bytes of the tensor, via a uint8 view (numpy has no bfloat16).
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            handle.write(memoryview(data))

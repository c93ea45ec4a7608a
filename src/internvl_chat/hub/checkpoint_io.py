"""Safe, streaming checkpoint reading and writing for `internvl-chat convert` / `export`.

    from internvl_chat.hub.checkpoint_io import ShardedWriter, iter_tensors, tensor_specs, weight_files

    files = weight_files("llava-v1.5-7b")                  # shards in index order; a missing shard is an error
    layout = {rename(n): (shape, dtype) for f in files for n, shape, dtype in tensor_specs(f)}  # headers only
    writer = ShardedWriter("out", layout, max_shard_size="5GB")   # shards planned by huggingface_hub
    for path in files:
        for name, tensor in iter_tensors(path):           # one tensor at a time (safetensors) / mmap (.bin)
            writer.add(rename(name), tensor)              # a shard is written as soon as it is complete
    writer.close()                                         # model-0000i-of-0000N.safetensors + index

Rules:
* `.safetensors` files are read lazily, tensor by tensor; a truncated or corrupt file raises `CheckpointError`
  naming the file.
* `.bin` files are read only with `torch.load(weights_only=True)` (memory-mapped when the file is a zip archive);
  a pickle that holds anything but tensors is refused with an error naming the file.
* Anything else (`.pt`, `.pth`, `.ckpt`, `.pkl`, `.h5`, ...) is refused.
* A shard index may only name files inside its folder (no absolute paths, no `..`): anything else is refused.
* Output is always safetensors: `huggingface_hub.split_torch_state_dict_into_shards` plans the shards from the
  layout (names, shapes, dtypes, in arrival order), and `safetensors.torch.save_file` writes each shard as soon as
  its last tensor arrives. Peak memory is about one shard plus one tensor when tensors arrive in layout order.
  Files get the permissions of an ordinary file (`0666 & ~umask`), as the JSON files next to them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
# Suffixes that hold pickles or formats we never execute / read.
REFUSED_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".npz", ".joblib")

# safetensors dtype names (the format's spec) → torch dtypes, to read a layout from headers alone.
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    _ST_DTYPES.update(F8_E4M3=torch.float8_e4m3fn, F8_E5M2=torch.float8_e5m2)


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


class UnsafeShardPath(CheckpointError):
    """A shard index names a file outside its checkpoint folder (an absolute path or one with `..`)."""


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The index's `weight_map` (tensor → shard file), checked: every shard is a plain file name inside the folder."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"Cannot read the shard index {index_path}: {err}") from err
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"Cannot read the shard index {index_path}: weight_map is not an object.")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"Shard index {index_path}: tensor {name!r} maps to {shard!r}, not a file name.")
        # [IMPORTANT] judged on the text, not on resolved paths: a Hub cache snapshot is a folder of symlinks
        # into ../../blobs, which is fine; a name that climbs out of the folder or is absolute is not.
        parts = shard.replace("\\", "/").split("/")
        if shard.startswith(("/", "\\")) or Path(shard).is_absolute() or ".." in parts or ":" in parts[0]:
            raise UnsafeShardPath(
                f"Refusing the shard index {index_path}: tensor {name!r} points to {shard!r}, outside the checkpoint "
                "folder (shards must be files inside it)."
            )
    return weight_map


def _index_shards(index_path: Path) -> list[Path]:
    shards = list(dict.fromkeys(_read_weight_map(index_path).values()))  # index order, deduplicated
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


def tensor_specs(path: str | Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of one weight file, in file order, without reading tensor data
    (the header of a safetensors file; a `.bin` is loaded memory-mapped)."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise CheckpointError(f"Missing weight file {path}.")
    if not path.name.endswith(".safetensors"):
        return [(name, tuple(t.shape), t.dtype) for name, t in _load_bin(path).items()]
    specs = []
    with _open_safetensors(path) as handle:
        for name in handle.keys():
            view = handle.get_slice(name)
            dtype = _ST_DTYPES.get(view.get_dtype())
            if dtype is None:
                raise CheckpointError(f"Tensor {name!r} in {path} has dtype {view.get_dtype()}, which we do not read.")
            specs.append((name, tuple(view.get_shape()), dtype))
    return specs


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


def folder_tensor_names(folder: str | Path) -> list[str] | None:
    """Names of all tensors of a folder without loading data, or None when only pickles could tell."""
    folder = Path(folder)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            return list(_read_weight_map(folder / index_name))
    files = weight_files(folder, required=False)
    if files and all(p.name.endswith(".safetensors") for p in files):
        return [name for p in files for name in tensor_names(p)]
    return None


def _file_mode() -> int:
    """The mode of a newly created ordinary file under the current umask (safetensors' writer creates 0600)."""
    try:
        with open("/proc/self/status") as status:  # Linux: read the umask without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file` (writes from the tensors' memory, no serialised copy), ordinary permissions."""
    from safetensors.torch import save_file

    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"Cannot write {path}: {err}") from err
    os.chmod(path, _file_mode())


Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class ShardedWriter:
    """Writes a planned set of tensors into sharded safetensors, each shard as soon as its last tensor arrives.

    `layout`: name → (shape, dtype) of every tensor that will be added, in the order they will arrive (floating
    tensors are cast to the layout's dtype on `add`). `huggingface_hub.split_torch_state_dict_into_shards` plans
    the shards on meta tensors of that layout, so the files and the index are those `save_pretrained` would write
    for the same tensors in the same order. Shards go to `*.partial` files, renamed by `close()`.
    """

    def __init__(self, folder: str | Path, layout: Layout, max_shard_size: int | str = "5GB"):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.layout = dict(layout)
        meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in self.layout.items()}
        self.split = split_torch_state_dict_into_shards(
            meta, filename_pattern="model{suffix}.safetensors", max_shard_size=parse_size(max_shard_size)
        )
        self._shard_of = self.split.tensor_to_filename
        self._pending = {f: set(names) for f, names in self.split.filename_to_tensors.items()}
        self._buffers: dict[str, dict[str, torch.Tensor]] = {f: {} for f in self._pending}
        self._written: list[Path] = []
        self.names: set[str] = set()  # tensors added so far
        self.total_size = int(self.split.metadata["total_size"])

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.layout:
            raise CheckpointError(f"Tensor {name!r} is not in the planned layout.")
        if name in self.names:
            raise CheckpointError(f"Tensor {name!r} written twice (two source keys map onto it).")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"Tensor {name!r} has shape {tuple(tensor.shape)}, the layout {tuple(shape)}.")
        if tensor.dtype != dtype:
            if not (tensor.is_floating_point() and dtype.is_floating_point):
                raise CheckpointError(f"Tensor {name!r} has dtype {tensor.dtype}, the layout {dtype}.")
            tensor = tensor.to(dtype)
        filename = self._shard_of[name]
        self._buffers[filename][name] = tensor
        self._pending[filename].discard(name)
        self.names.add(name)
        if not self._pending[filename]:
            self._write(filename)

    def _write(self, filename: str) -> None:
        path = self.folder / (filename + ".partial")
        tensors = self._buffers.pop(filename)
        save_safetensors(path, tensors, metadata={"format": "pt"})
        self._written.append(path)

    def close(self) -> list[Path]:
        """Renames the shards into place and writes the index (sharded output); returns the shard paths."""
        missing = sorted(n for names in self._pending.values() for n in names)
        if missing:
            raise CheckpointError(f"Tensors planned but never added ({len(missing)}): {missing[:10]}")
        final = []
        for filename in self.split.filename_to_tensors:
            os.replace(self.folder / (filename + ".partial"), self.folder / filename)
            final.append(self.folder / filename)
        if self.split.is_sharded:
            index = {
                "metadata": self.split.metadata,
                "weight_map": dict(sorted(self.split.tensor_to_filename.items())),
            }
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return final

    def abort(self) -> None:
        for path in self._written:
            path.unlink(missing_ok=True)
        self._buffers.clear()

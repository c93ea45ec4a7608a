"""Readers and converters for the training-data formats of the LLaVA family, all normalised to one sample dict.

Every reader yields the same *normalised sample*::

    {"id": "000123",                                  # the record's id (or its index in the file)
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\\nWhat is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "images": ["/data/coco/0001.jpg"],               # paths (resolved against the image folder), bytes or PIL
     "source": "/data/llava_v1_5_mix665k.json"}       # the file the sample came from (for error messages)

Formats:

* **LLaVA JSON / JSONL**: records ``{"id", "image": str | [str, ...] (optional), "conversations": [{"from":
  "human" | "gpt" | "system", "value": "..."}]}``. Each literal ``<image>`` becomes an image block at its place in
  the text (so converting back is exact); text-only samples have no ``image``.
* **HF datasets** with ``messages`` (HF message lists, content a string or a list of blocks) and ``images``
  (paths, ``{"bytes", "path"}`` dicts or a ``datasets.Image`` column): a ``save_to_disk`` folder or ``.parquet``
  file(s). Images are not decoded while reading (the column is cast to ``Image(decode=False)``).
* **InternVL meta file**: a JSON object ``{name: {"root": DIR, "annotation": FILE.jsonl, "repeat_time": 1.0}}``;
  every annotation is a LLaVA JSON/JSONL file whose images are relative to ``root``. ``repeat_time`` 2 repeats a
  source twice; a fractional part keeps a deterministic (seeded) random subset, e.g. 0.5 keeps half.

Usage::

    from internvl_chat.data.formats import read_samples, convert

    samples = read_samples("llava_v1_5_mix665k.json", image_folder="/data")          # list of normalised samples
    samples = read_samples("data.json", image_folder="/data", on_error="skip", stats=counter)   # skip bad records
    convert("llava.json", "out.parquet", to="parquet")     # image paths are kept relative; also "datasets", "llava"

Structural problems (unknown role, empty conversation, no answer, more ``<image>`` than images or the reverse)
raise :class:`DataError` naming the sample id and the file; ``on_error="skip"`` logs and counts them instead.
Image files are only opened later (lazily, by :class:`~internvl_chat.data.dataset.VisionChatDataset`, or by
``internvl-chat data check``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# File suffixes read as images when a folder is listed or a path is given (caption, data generate, lmms-eval).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def file_content_id(path: str | os.PathLike, length: int = 16) -> str:
    """A file's content id: the first ``length`` hex digits of the SHA-256 of its bytes (read in 1 MiB blocks), so
    the same picture under two names is handled once (caption, data generate)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_TOKEN",
    "file_content_id",
    "DataError",
    "convert",
    "count_image_blocks",
    "detect_format",
    "llava_record_to_sample",
    "modality_length",
    "sample_images",
    "word_length",
    "hf_record_to_sample",
    "read_llava_records",
    "read_meta",
    "read_samples",
    "sample_to_llava_record",
    "samples_to_hf_dataset",
    "validate_sample",
    "write_llava",
]

IMAGE_TOKEN = "<image>"
# LLaVA's `from` values (ShareGPT style) → HF roles; HF role names are accepted too.
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
HF_ROLES = ("system", "user", "assistant")
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A sample that cannot be used; the message names the file and the sample id.

    ``kind`` is a short machine-readable tag: ``unknown_role``, ``empty_conversation``, ``no_answer``,
    ``image_count``, ``missing_image``, ``corrupt_image``, ``bad_record``, ``over_length``, ``mask``.
    """

    def __init__(self, message: str, sample_id: Any = None, source: Any = None, kind: str = "bad_record"):
        self.sample_id = sample_id
        self.source = source
        self.kind = kind
        self.detail = message
        super().__init__(f"{source}: sample {sample_id!r}: {message} [{kind}]")


# ------------------------------------------------------------------------------------------------ LLaVA records
def _text_to_blocks(text: str) -> list[dict[str, Any]]:
    """Splits a LLaVA turn at each literal ``<image>`` into text and image blocks, in order (exactly reversible)."""
    blocks: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            blocks.append({"type": "image"})
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def _blocks_to_text(content: Any) -> str:
    """Inverse of :func:`_text_to_blocks`: image blocks become ``<image>``, text blocks are concatenated."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for block in content:
        if block.get("type") == "image":
            out.append(IMAGE_TOKEN)
        elif block.get("type") == "text":
            out.append(block.get("text") or "")
    return "".join(out)


def _image_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _resolve(path: Any, root: str | os.PathLike | None) -> Any:
    # Only relative string paths are joined; PIL images, bytes, dicts, URLs and absolute paths are kept.
    if root is None or not isinstance(path, str) or os.path.isabs(path) or "://" in path or path.startswith("data:"):
        return path
    return os.path.join(os.fspath(root), path)


def llava_record_to_sample(
    record: dict[str, Any], source: str, index: int, image_folder: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Normalises one LLaVA record; raises :class:`DataError` (with id and file) when it is malformed."""
    sample_id = record.get("id", index) if isinstance(record, dict) else index
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, not an object", sample_id, source)
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise DataError("no 'conversations' list", sample_id, source, "empty_conversation")
    messages = []
    for turn, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise DataError(f"turn {turn} is not an object", sample_id, source)
        role = LLAVA_ROLES.get(message.get("from", message.get("role")))
        if role is None:
            raise DataError(
                f"turn {turn}: unknown role {message.get('from', message.get('role'))!r} "
                f"(expected one of {sorted(LLAVA_ROLES)})",
                sample_id,
                source,
                "unknown_role",
            )
        value = message.get("value", message.get("content"))
        if value is not None and not isinstance(value, str):
            raise DataError(f"turn {turn}: 'value' is a {type(value).__name__}, not a string", sample_id, source)
        messages.append({"role": role, "content": _text_to_blocks(value or "")})
    images = [_resolve(p, image_folder) for p in _image_list(record.get("image", record.get("images")))]
    sample = {"id": sample_id, "messages": messages, "images": images, "source": str(source)}
    validate_sample(sample)
    return sample


def sample_to_llava_record(sample: dict[str, Any]) -> dict[str, Any]:
    """A normalised sample back to a LLaVA record (one image → a string, several → a list, none → no key)."""
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    record: dict[str, Any] = {"id": sample["id"]}
    images = [_image_path(im) for im in sample.get("images") or []]
    if len(images) == 1:
        record["image"] = images[0]
    elif images:
        record["image"] = images
    record["conversations"] = [
        {"from": roles[m["role"]], "value": _blocks_to_text(m.get("content"))} for m in sample["messages"]
    ]
    return record


def _image_path(image: Any) -> str:
    if isinstance(image, str):
        return image
    if isinstance(image, dict) and image.get("path"):
        return image["path"]
    raise TypeError(f"Cannot write an image of type {type(image).__name__} as a path (LLaVA JSON keeps paths only).")


# ------------------------------------------------------------------------------------------------- validation
def count_image_blocks(messages: Iterable[dict[str, Any]]) -> int:
    """Number of image placeholders: image blocks plus literal ``<image>`` strings in text (as the templates do)."""
    n = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            n += content.count(IMAGE_TOKEN)
            continue
        for block in content or []:
            if block.get("type") == "image":
                n += 1
            elif block.get("type") == "text":
                n += (block.get("text") or "").count(IMAGE_TOKEN)
    return n


def sample_images(sample: dict[str, Any]) -> list[Any]:
    """A sample's image references (``images``, or a single ``image``) as a list; ``[]`` for text-only."""
    images = sample.get("images")
    if images is None:
        images = sample.get("image")
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


# ------------------------------------------------------------------------------------------------ length proxy
def word_length(sample: dict[str, Any]) -> int:
    """LLaVA's length proxy for ``group_by_modality_length``: ``str.split()`` words of every turn's text.

    The text is the LLaVA ``value`` of each turn (image blocks written back as ``<image>`` in place, exactly as
    the record held it), so ``"<image>\nWhat is it?"`` is 4 words and ``"<image>What"`` is 1.
    """
    return sum(len(_blocks_to_text(message.get("content")).split()) for message in sample["messages"])


def modality_length(sample: dict[str, Any]) -> int:
    """LLaVA's ``modality_lengths`` entry: :func:`word_length`, negated for a text-only sample.

    The sign is the modality for LLaVA's sampler (``> 0`` image, ``< 0`` text-only); a text-only sample without a
    word gives 0, which the sampler rejects (as LLaVA's does).
    """
    words = word_length(sample)
    return words if sample_images(sample) else -words


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join((b.get("text") or "") for b in content or [] if b.get("type") == "text")


def validate_sample(sample: dict[str, Any]) -> None:
    """Structural checks shared by every format; raises :class:`DataError` naming the sample and its file.

    Errors: no messages, a role other than system/user/assistant, a system message that is not first, no assistant
    turn (nothing to learn: the original code would have trained on an all -100 sample), and a different number of
    image placeholders than images. Empty turns are legal here (``data check`` reports them as warnings).
    """
    sid, src = sample.get("id"), sample.get("source")
    messages = sample.get("messages")
    if not messages:
        raise DataError("empty conversation (no messages)", sid, src, "empty_conversation")
    for turn, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in HF_ROLES:
            raise DataError(
                f"turn {turn}: unknown role {role!r} (expected one of {HF_ROLES})", sid, src, "unknown_role"
            )
        if role == "system" and turn != 0:
            raise DataError(f"turn {turn}: a system message must come first", sid, src, "unknown_role")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn (nothing to supervise)", sid, src, "no_answer")
    placeholders = count_image_blocks(messages)
    n_images = len(sample.get("images") or [])
    if placeholders != n_images:
        raise DataError(
            f"{placeholders} image placeholder(s) (<image> / image blocks) but {n_images} image(s)",
            sid,
            src,
            "image_count",
        )


def empty_turns(sample: dict[str, Any]) -> list[int]:
    """Indices of turns with neither text nor image (reported by ``data check``; legal but suspicious)."""
    out = []
    for i, message in enumerate(sample["messages"]):
        content = message.get("content")
        has_image = not isinstance(content, str) and any(b.get("type") == "image" for b in content or [])
        if not has_image and not _content_text(content).replace(IMAGE_TOKEN, "").strip():
            out.append(i)
    return out


# -------------------------------------------------------------------------------------------- HF datasets records
def _clean_block(block: dict[str, Any]) -> dict[str, Any]:
    # Arrow stores every block with all struct keys (`{"type": "image", "text": None}`): drop the None fields.
    return {k: v for k, v in block.items() if v is not None}


def hf_record_to_sample(
    record: dict[str, Any], source: str, index: int, image_folder: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Normalises one HF ``messages`` + ``images`` row; raises :class:`DataError` when malformed."""
    sample_id = record.get("id")
    sample_id = index if sample_id is None else sample_id
    raw = record.get("messages")
    if not isinstance(raw, list):
        raise DataError("no 'messages' list", sample_id, source, "empty_conversation")
    messages = []
    for turn, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(f"turn {turn} is not an object", sample_id, source)
        content = message.get("content")
        if isinstance(content, list):
            content = [_clean_block(b) for b in content]
        messages.append({"role": message.get("role"), "content": content})
    images = [_resolve(p, image_folder) for p in _image_list(record.get("images", record.get("image")))]
    sample = {"id": sample_id, "messages": messages, "images": images, "source": str(source)}
    validate_sample(sample)
    return sample


def _undecoded(ds):
    """Casts an ``Image`` (or list of ``Image``) ``images`` column to ``decode=False`` so reading stays cheap."""
    from datasets import Image

    feature = ds.features.get("images")
    inner = getattr(feature, "feature", None)
    if isinstance(inner, Image) and inner.decode:
        ds = ds.cast_column("images", type(feature)(Image(decode=False)))
    elif isinstance(feature, Image) and feature.decode:
        ds = ds.cast_column("images", Image(decode=False))
    return ds


def load_hf_dataset(path: str | os.PathLike):
    """A ``save_to_disk`` folder (a ``Dataset``, or the ``train`` split of a ``DatasetDict``) or parquet file(s)."""
    import datasets

    path = os.fspath(path)
    if os.path.isdir(path) and not any(str(p).endswith(".parquet") for p in Path(path).iterdir()):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path}: a DatasetDict without a 'train' split ({list(ds)}); pass a split folder")
            ds = ds["train"]
    else:
        files = sorted(str(p) for p in Path(path).glob("*.parquet")) if os.path.isdir(path) else [path]
        ds = datasets.Dataset.from_parquet(files)
    return _undecoded(ds)


# ---------------------------------------------------------------------------------------------------- readers
def read_llava_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Raw records of a LLaVA ``.json`` (a list) or ``.jsonl`` (one object per line) file."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = []
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"line {line_no} is not valid JSON: {err}", f"line {line_no}", path) from err
            return records
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA JSON file holds a list of records, got a {type(data).__name__}")
    return data


def detect_format(path: str | os.PathLike) -> str:
    """``"llava"``, ``"meta"`` (InternVL meta file), ``"datasets"`` (save_to_disk folder) or ``"parquet"``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "parquet" if any(str(p).endswith(".parquet") for p in Path(path).iterdir()) else "datasets"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".jsonl"):
        return "llava"
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("{"):
            return "meta"
        return "llava"
    raise ValueError(f"{path}: unknown data format (expected .json, .jsonl, .parquet or a datasets folder)")


def _collect(
    items: Iterable[tuple[int, Any]], make, on_error: str, stats: Counter | None, errors: list | None = None
) -> Iterator[dict[str, Any]]:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    for index, record in items:
        try:
            yield make(record, index)
        except DataError as err:
            if on_error == "raise":
                raise
            if stats is not None:
                stats["skipped"] += 1
                stats[f"skipped_{err.kind}"] += 1
            if errors is not None:
                errors.append(err)
            logger.warning("skipping %s", err)


def read_meta(
    path: str | os.PathLike,
    on_error: str = "raise",
    stats: Counter | None = None,
    seed: int = 0,
    errors: list | None = None,
) -> list[dict[str, Any]]:
    """Reads an InternVL meta file: every source's LLaVA annotation, images under its ``root``, ``repeat_time``.

    ``repeat_time`` r: ``floor(r)`` full copies, then a deterministic random subset of ``round(frac(r) * n)``
    samples (seeded by ``seed`` and the source name, kept in file order), so 0.5 keeps half and 2.25 gives two
    copies plus a quarter. Relative ``root`` / ``annotation`` paths are relative to the meta file's folder.
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
        raise ValueError(f"{path}: an InternVL meta file maps source names to {{root, annotation, repeat_time}}")
    samples: list[dict[str, Any]] = []
    for name, entry in meta.items():
        if "annotation" not in entry:
            raise ValueError(f"{path}: source {name!r} has no 'annotation'")
        annotation = _resolve(entry["annotation"], base)
        root = _resolve(entry.get("root", ""), base) if entry.get("root") is not None else None
        repeat = float(entry.get("repeat_time", 1))
        if repeat < 0:
            raise ValueError(f"{path}: source {name!r} has a negative repeat_time {repeat}")
        source = read_samples(annotation, image_folder=root, on_error=on_error, stats=stats, errors=errors)
        whole = int(math.floor(repeat))
        extra = int(round((repeat - whole) * len(source)))
        rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
        chosen = sorted(rng.sample(range(len(source)), extra)) if extra else []
        picked = source * whole + [source[i] for i in chosen]
        logger.info("meta source %s: %d samples × repeat_time %s → %d", name, len(source), repeat, len(picked))
        samples.extend(picked)
    return samples


def read_samples(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_error: str = "raise",
    stats: Counter | None = None,
    fmt: str | None = None,
    errors: list | None = None,
):
    """Reads any supported file into normalised samples (see the module docstring).

    Args:
        path: LLaVA ``.json``/``.jsonl``, InternVL meta ``.json``, a ``save_to_disk`` folder or ``.parquet``.
        image_folder: folder that relative image paths are joined to (``None`` keeps them as written).
        on_error: ``"raise"`` (default) stops at the first malformed record with its id and file; ``"skip"`` logs
            and drops it, counting ``stats["skipped"]`` and ``stats["skipped_<kind>"]``.
        stats: a ``collections.Counter`` that receives the skip counts.
        errors: a list that receives the skipped records' :class:`DataError` (``data check`` uses it).
        fmt: force a format (``llava``, ``meta``, ``datasets``, ``parquet``) instead of detecting it.

    Returns:
        A list of samples for JSON inputs; for HF datasets a lazy read-only sequence (rows are normalised on
        access, images stay undecoded) after a validation pass over every row.
    """
    fmt = fmt or detect_format(path)
    source = os.fspath(path)
    if fmt == "meta":
        return read_meta(path, on_error=on_error, stats=stats, errors=errors)
    if fmt == "llava":
        records = read_llava_records(path)
        return list(
            _collect(
                enumerate(records),
                lambda r, i: llava_record_to_sample(r, source, i, image_folder),
                on_error,
                stats,
                errors,
            )
        )
    if fmt in ("datasets", "parquet"):
        return HFSamples(load_hf_dataset(path), source, image_folder, on_error, stats, errors)
    raise ValueError(f"unknown format {fmt!r}")


class HFSamples:
    """Lazy sequence of normalised samples over a HF ``Dataset`` (rows read and normalised on access).

    The constructor validates every row's ``messages`` / image count once (cheap: the images column is not
    decoded) and keeps the indices of the valid rows, so ``on_error="skip"`` drops bad rows up front.
    """

    def __init__(
        self,
        ds,
        source: str,
        image_folder=None,
        on_error: str = "raise",
        stats: Counter | None = None,
        errors: list | None = None,
    ):
        self.ds = ds
        self.source = source
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        columns = [c for c in ("id", "messages", "images", "image") if c in ds.column_names]
        light = ds.select_columns(columns)

        def check(record, index):
            hf_record_to_sample(record, source, index, None)
            return index

        self.indices = list(_collect(enumerate(light), check, on_error, stats, errors))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        return hf_record_to_sample(self.ds[index], self.source, index, self.image_folder)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


# -------------------------------------------------------------------------------------------------- converters
def write_llava(samples: Iterable[dict[str, Any]], path: str | os.PathLike) -> int:
    """Writes samples as LLaVA JSON (``.json``: an indented list; ``.jsonl``: one record per line)."""
    records = [sample_to_llava_record(s) for s in samples]
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
    return len(records)


def _to_hf_rows(samples: Iterable[dict[str, Any]], keep_image_objects: bool = False) -> dict[str, list[Any]]:
    # A fixed schema for Arrow: content is always a list of {"type", "text"} blocks (text None for images), ids
    # are strings, images are (relative) path strings -- never embedded bytes, so paths stay portable.
    rows: dict[str, list[Any]] = {"id": [], "messages": [], "images": []}
    for sample in samples:
        rows["id"].append(str(sample["id"]))
        messages = []
        for m in sample["messages"]:
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            messages.append(
                {"role": m["role"], "content": [{"type": b["type"], "text": b.get("text")} for b in blocks]}
            )
        rows["messages"].append(messages)
        images = sample.get("images") or []
        rows["images"].append(list(images) if keep_image_objects else [_image_path(im) for im in images])
    return rows


def _hf_dataset(samples: Iterable[dict[str, Any]]):
    import datasets

    block = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(block)}),
            "images": datasets.List(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(_to_hf_rows(samples), features=features)


def samples_to_hf_dataset(samples: Iterable[dict[str, Any]]):
    """A HF ``datasets.Dataset`` of samples (``id``, ``messages``, ``images``, ``source``), images undecoded.

    For trainers that insist on a HF dataset (TRL's ``SFTTrainer``): images are stored as references
    (``Image(decode=False)``: ``{"bytes", "path"}``), so rows stay light and
    :class:`~internvl_chat.training.collator.VisionChatCollator` opens them in the DataLoader workers (errors name
    the sample id and file). Ids become strings (Arrow needs one type).
    """
    import datasets

    samples = list(samples)
    rows = _to_hf_rows(samples, keep_image_objects=True)
    rows["source"] = [str(s.get("source")) for s in samples]
    block = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(block)}),
            "images": datasets.List(datasets.Image(decode=False)),
            "source": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, on_error: str = "raise") -> int:
    """Converts ``src`` (any readable format) to ``dst`` as ``llava`` (JSON/JSONL), ``datasets`` or ``parquet``.

    Image paths are copied as written (relative paths stay relative to the same image folder). Returns the number
    of samples written.
    """
    stats: Counter = Counter()
    samples = list(read_samples(src, image_folder=None, on_error=on_error, stats=stats))
    if stats["skipped"]:
        logger.warning("%s: skipped %d malformed records (%s)", src, stats["skipped"], dict(stats))
    if to == "llava":
        n = write_llava(samples, dst)
    elif to == "datasets":
        _hf_dataset(samples).save_to_disk(os.fspath(dst))
        n = len(samples)
    elif to == "parquet":
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        _hf_dataset(samples).to_parquet(os.fspath(dst))
        n = len(samples)
    else:
        raise ValueError(f"--to must be llava, datasets or parquet, got {to!r}")
    logger.info("converted %d samples: %s → %s (%s)", n, src, dst, to)
    return n

"""Shared file I/O of the task readers and submission writers: question / annotation files in every supported
format (jsonl, json, tsv, csv, parquet, saved datasets), image cells, and the JSON / XLSX writers.

Images are decoded by the one loader, `internvl_chat.data.images.load_image` (the eval runner calls it); the
RGB conversion and its alpha rule (LLaVA's plain ``convert("RGB")`` by default) belong to the checkpoint's image
processor, so eval, training and serving apply the same rule."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

from .base import TaskContext


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists()
        or (path / "state.json").exists()
        or (path / "dataset_dict.json").exists()
    )


def load_records(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows of a ``.jsonl`` / ``.json`` / ``.tsv`` / ``.csv`` / ``.parquet`` file, a folder of parquet files, or a
    ``datasets.save_to_disk`` folder (``split`` picks a split of a DatasetDict; default: "test", else the only
    one). JSON files may hold a list, ``{"data": [...]}``, ``{"questions": [...]}`` or an id -> record mapping
    (the id is kept as ``_key``)."""
    path = Path(path)
    if is_saved_dataset(path):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            name = split or ("test" if "test" in ds else None)
            if name is None:
                if len(ds) != 1:
                    raise ValueError(f"{path} holds splits {list(ds)}; pass --split")
                name = next(iter(ds))
            ds = ds[name]
        return [dict(row) for row in ds]
    if path.is_dir():
        files = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True))
        if split:
            files = [f for f in files if split in Path(f).name] or files
        if not files:
            raise FileNotFoundError(f"No parquet files or saved dataset in {path}")
        return [row for f in files for row in load_records(f)]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # [IMPORTANT] POPE's coco_pope_*.json (and a few LLaVA files) are JSON lines despite the extension.
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict):
            for key in ("data", "questions", "annotations"):
                if isinstance(data.get(key), list):
                    return data[key]
            return [{"_key": k, **v} if isinstance(v, dict) else {"_key": k, "value": v} for k, v in data.items()]
        return list(data)
    if suffix in (".tsv", ".csv", ".parquet"):
        import pandas as pd

        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            # [IMPORTANT] keep every cell as text: MMBench answers like "1" or options like "None" must not become
            # numbers / NaN.
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        return [_native(row) for row in frame.to_dict(orient="records")]
    raise ValueError(f"Unsupported data file {path} (jsonl, json, tsv, csv, parquet or a saved dataset folder)")


def _native(value):
    """numpy arrays / scalars of parquet cells -> lists / Python scalars (answers lists arrive as arrays)."""
    if isinstance(value, dict):
        return {k: _native(v) for k, v in value.items()}
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return [_native(v) for v in value] if getattr(value, "ndim", 0) else value.item()
    if isinstance(value, list):
        return [_native(v) for v in value]
    return value


def first(rec: dict, *keys, default=None):
    for key in keys:
        value = rec.get(key)
        if (
            value is not None
            and not (isinstance(value, float) and math.isnan(value))
            and not (isinstance(value, str) and value == "")
        ):
            return value
    return default


def is_none(value) -> bool:
    """LLaVA's is_none for MMBench cells: None, NaN, 'nan', 'none' (any case), or empty."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none", "")


def image_value(value, image_folder: str | None):
    """Turns an image cell into something `load_image` opens: dicts from parquet / datasets give their bytes,
    relative paths are joined to the image folder, everything else is kept (PIL, bytes, base64)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (list, tuple)):
        return image_value(value[0], image_folder) if value else None
    if isinstance(value, str) and image_folder and len(value) < 1024 and not os.path.isabs(value):
        return os.path.join(image_folder, value)
    return value


def answers_of(rec: dict):
    value = first(rec, "answers", "answer", "gt_answers", "ground_truth", "label", "labels", "correct_ans")
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    out = []
    for a in list(value):
        out.append(str(a["answer"]) if isinstance(a, dict) else str(a))
    return out


def record_id(rec: dict, row: int):
    return first(rec, "question_id", "questionId", "id", "index", "_key", default=row)


IMAGE_KEYS = (
    "image", "image_path", "img_path", "imagename", "image_file", "file_name", "filename", "file_path",
    "image_local_name", "imgname", "images",
)  # fmt: skip


def with_suffix(text: str, *lines: str) -> str:
    """Appends the protocol lines unless the text (a LLaVA question file) already ends with them."""
    tail = "\n".join(line for line in lines if line)
    if not tail or text.rstrip().endswith(tail):
        return text
    return text + "\n" + tail


def find_annotation(ctx: TaskContext, *names: str) -> str | None:
    if ctx.annotations:
        return ctx.annotations
    base = Path(ctx.data).parent if Path(ctx.data).is_file() else Path(ctx.data)
    for name in names:
        if (base / name).exists():
            return str(base / name)
    return None


def write_json(obj, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return path


def write_xlsx(rows: list[dict], columns: list[str], path: str) -> str:
    """A one-sheet .xlsx of ``rows`` (missing cells empty) with ``columns`` in that order (pandas + openpyxl)."""
    import pandas as pd

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_excel(path, index=False, engine="openpyxl")
    return path

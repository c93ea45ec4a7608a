"""The benchmark registry: one row per task (reader, prompt, generation length, scorer, submission writer).

    from internvl_chat.eval.tasks import TASKS, get_task
    task = get_task("textvqa")
    samples = task.read(TaskContext(data="llava_textvqa_val_v051_ocr.jsonl", image_folder="train_images",
                                    annotations="TextVQA_0.5.1_val.json"))
    scores = task.score(samples, predictions, TaskContext(...))     # predictions: {str(id): generated text}

Readers take the files people have on disk (no network):

* LLaVA's eval question files (``.jsonl`` with ``question_id`` / ``image`` / ``text``; the ScienceQA ``.json`` with
  ``conversations``) plus an image folder. Their ``text`` already carries the protocol suffix and is used verbatim
  (a missing suffix is appended); ground truth comes from ``--annotations`` (TextVQA json, GQA questions json,
  POPE ``coco_pope_*.json`` folder, MME release folder, ScienceQA ``problems.json``, SEED-Bench.json, VQAv2
  annotations, MM-Vet ``mm-vet.json``...).
* The benchmarks' own files (TextVQA / DocVQA / InfoVQA / ST-VQA ``{"data": [...]}``, ChartQA lists, OCRBench.json,
  Q-Bench json, MME folder, SEED-Bench.json) -- prompts are then built with the suffixes of reference.md section 9.
* MMBench / MMBench-CN TSVs with base64 images (VLMEvalKit's short "image" references to another row resolved).
* Parquet files, folders of parquet files and ``datasets.save_to_disk`` folders (image columns as ``{"bytes"}``
  dicts or PIL images), with the same column names as the Hub copies (lmms-lab / HuggingFaceM4 layouts).

Adding a benchmark is one ``Task(...)`` row in ``TASKS``.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import io
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import metrics

logger = logging.getLogger(__name__)

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
MC_SUFFIX_CN = "请直接回答选项字母。"
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
OCR_PREFIX = "Reference OCR token: "
MME_YES_NO = "Please answer yes or no."
LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass
class Sample:
    """One question: ``prompt`` is the user text (the image placeholder is added by the chat template)."""

    id: Any
    prompt: str
    image: Any = None  # path, bytes, base64 string, PIL image, or None (text-only)
    target: Any = None  # task-specific ground truth (answers list, label, letter...); None when unknown
    meta: dict = dataclasses.field(default_factory=dict)
    uid: str | None = None  # set by `ensure_unique_keys` when the file repeats an id (LLaVA's MME file does)

    @property
    def key(self) -> str:
        """The id predictions are stored under: unique within a task."""
        return self.uid or str(self.id)


def ensure_unique_keys(samples: list[Sample]) -> list[Sample]:
    """Gives repeated ids a ``#n`` suffix (second occurrence ``#2``...), deterministically in file order."""
    seen: dict[str, int] = {}
    for s in samples:
        base = str(s.id)
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            s.uid = f"{base}#{seen[base]}"
    return samples


@dataclasses.dataclass
class TaskContext:
    """What a reader / scorer gets from the command line."""

    data: str
    image_folder: str | None = None
    annotations: str | None = None
    split: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    judge: Any = None  # a judge.JudgeClient for judged tasks
    output: str | None = None  # the task's output folder (judge caches, submission files)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    family: str
    description: str
    reader: Callable[[TaskContext], list[Sample]]
    scorer: Callable[[list[Sample], dict[str, str], TaskContext], dict]
    max_new_tokens: int = 128
    submission: Callable[[list[Sample], dict[str, str], TaskContext, str], str | None] | None = None
    judged: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    reference_key: str | None = None  # key of the seed numbers in report.SEED_SCORES

    def read(self, ctx: TaskContext) -> list[Sample]:
        """The task's questions, with unique keys."""
        return ensure_unique_keys(self.reader(ctx))

    def score(self, samples: list[Sample], predictions: dict[str, str], ctx: TaskContext) -> dict:
        """Scores ``predictions`` ({key: generated text}); ``{"main": None}`` when there is no ground truth."""
        return self.scorer(samples, predictions, ctx)


# ----------------------------------------------------------------------------------------------------------------
# Loading files
# ----------------------------------------------------------------------------------------------------------------


def _is_hf_dataset_dir(path: Path) -> bool:
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
    if _is_hf_dataset_dir(path):
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


def _first(rec: dict, *keys, default=None):
    for key in keys:
        value = rec.get(key)
        if (
            value is not None
            and not (isinstance(value, float) and math.isnan(value))
            and not (isinstance(value, str) and value == "")
        ):
            return value
    return default


def _is_none(value) -> bool:
    """LLaVA's is_none for MMBench cells: None, NaN, 'nan', 'none' (any case), or empty."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none", "")


def _image_value(value, image_folder: str | None):
    """Turns an image cell into something `decode_image` opens: dicts from parquet / datasets give their bytes,
    relative paths are joined to the image folder, everything else is kept (PIL, bytes, base64)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (list, tuple)):
        return _image_value(value[0], image_folder) if value else None
    if isinstance(value, str) and image_folder and len(value) < 1024 and not os.path.isabs(value):
        return os.path.join(image_folder, value)
    return value


def decode_image(source):
    """Opens an image as LLaVA's eval scripts do: ``Image.open(...).convert("RGB")``.

    [IMPORTANT] plain ``convert("RGB")`` (alpha dropped, palette expanded) is what every published number used;
    the core loader's alpha compositing would change pixels of RGBA / LA images."""
    from PIL import Image

    if source is None:
        return None
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source))).convert("RGB")
    if isinstance(source, str):
        if os.path.exists(source):
            with Image.open(source) as image:
                return image.convert("RGB")
        if source.startswith("data:") and "," in source:
            source = source.split(",", 1)[1]
        if len(source) > 256:
            return Image.open(io.BytesIO(base64.b64decode(source))).convert("RGB")
        raise FileNotFoundError(f"Image not found: {source}")
    raise TypeError(f"Cannot open an image from {type(source).__name__}")


def _answers(rec: dict):
    value = _first(rec, "answers", "answer", "gt_answers", "ground_truth", "label", "labels", "correct_ans")
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    out = []
    for a in list(value):
        out.append(str(a["answer"]) if isinstance(a, dict) else str(a))
    return out


def _rec_id(rec: dict, row: int):
    return _first(rec, "question_id", "questionId", "id", "index", "_key", default=row)


IMAGE_KEYS = (
    "image", "image_path", "img_path", "imagename", "image_file", "file_name", "filename", "file_path",
    "image_local_name", "imgname", "images",
)  # fmt: skip


def _with_suffix(text: str, *lines: str) -> str:
    """Appends the protocol lines unless the text (a LLaVA question file) already ends with them."""
    tail = "\n".join(line for line in lines if line)
    if not tail or text.rstrip().endswith(tail):
        return text
    return text + "\n" + tail


def _find_annotation(ctx: TaskContext, *names: str) -> str | None:
    if ctx.annotations:
        return ctx.annotations
    base = Path(ctx.data).parent if Path(ctx.data).is_file() else Path(ctx.data)
    for name in names:
        if (base / name).exists():
            return str(base / name)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Short-answer VQA family (VQAv2, GQA, VizWiz, TextVQA, DocVQA, InfoVQA, ST-VQA, ChartQA, OCR sets, POPE, generic)
# ----------------------------------------------------------------------------------------------------------------


def read_vqa(ctx: TaskContext, suffix: tuple[str, ...] = (SHORT_ANSWER,), ocr: bool | None = None) -> list[Sample]:
    """Generic reader: ``text`` (LLaVA file, suffix kept/added) or ``question`` / ``query`` + suffix; ground truth
    from ``answers`` / ``answer`` / ``label`` or joined from ``ctx.annotations`` by question id (then image)."""
    samples = []
    for row, rec in enumerate(load_records(ctx.data, ctx.split)):
        image = _first(rec, *IMAGE_KEYS)
        if image is None and _first(rec, "image_id", "imageId") is not None:
            image = f"{_first(rec, 'image_id', 'imageId')}.jpg"  # TextVQA / GQA raw files name images by id
        text = rec.get("text") if "question" not in rec and "query" not in rec else None
        if text is not None:
            lines = text.split("\n")
            if ocr is False:
                lines = [line for line in lines if not line.startswith(OCR_PREFIX)]
            question = next((line for line in lines if not line.startswith(OCR_PREFIX)), lines[0])
            prompt = _with_suffix("\n".join(lines), *suffix)
        else:
            question = str(_first(rec, "question", "query", "prompt", default=""))
            ocr_line = ""
            if ocr and rec.get("ocr_tokens"):
                ocr_line = OCR_PREFIX + ", ".join(rec["ocr_tokens"])  # *unverified* join of LLaVA's OCR line
            prompt = "\n".join(x for x in (question, ocr_line, *suffix) if x)
        meta = {"question": question}
        for key in ("category", "dataset_name", "type", "question_type", "answer_type", "image_id", "imageId"):
            if rec.get(key) is not None:
                meta[key] = rec[key]
        if isinstance(image, str):
            meta["image_name"] = image
        samples.append(Sample(_rec_id(rec, row), prompt, _image_value(image, ctx.image_folder), _answers(rec), meta))
    if ctx.annotations:
        _join_answers(samples, ctx.annotations, ctx.split)
    return samples


def _join_answers(samples: list[Sample], path: str, split: str | None = None) -> None:
    """Fills ``target`` from an annotation file keyed by question id, else by image name (VizWiz), else by
    (image id, lower-cased question) as LLaVA's eval_textvqa does."""
    records = load_records(path, split)
    by_id, by_image, by_question = {}, {}, {}
    for rec in records:
        answers = _answers(rec)
        if answers is None:
            continue
        rid = _first(rec, "question_id", "questionId", "id", "_key")
        if rid is not None:  # never by row number: VizWiz annotations have no id and must join by image
            by_id[str(rid)] = answers
        image = _first(rec, *IMAGE_KEYS)
        if isinstance(image, str):
            by_image[os.path.basename(image)] = answers
        if rec.get("question") is not None and _first(rec, "image_id", "imageId") is not None:
            by_question[(str(_first(rec, "image_id", "imageId")), str(rec["question"]).lower())] = answers
    missing = 0
    for s in samples:
        found = by_question.get((s.key, s.meta.get("question", "").lower()))
        if found is None:
            found = by_id.get(s.key)
        if found is None and s.meta.get("image_name"):
            found = by_image.get(os.path.basename(s.meta["image_name"]))
        if found is None:
            missing += 1
        else:
            s.target = found
    if missing:
        logger.warning("%d of %d questions have no ground truth in %s", missing, len(samples), path)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _scored(samples, preds):
    return [(s, preds.get(s.key, "")) for s in samples if s.target is not None]


def _no_ground_truth(samples) -> dict:
    return {"main": None, "metric": None, "count": len(samples), "note": "no ground truth: predictions only"}


def score_vqa(samples, preds, ctx, protocol: str | None = None) -> dict:
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    protocol = ctx.options.get("protocol", protocol or "m4c")
    acc = _mean(metrics.vqa_accuracy(p, s.target, protocol=protocol) for s, p in pairs)
    return {"main": 100 * acc, "metric": f"vqa_accuracy ({protocol})", "count": len(pairs)}


def score_gqa(samples, preds, ctx) -> dict:
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    acc = _mean(metrics.gqa_accuracy(p, s.target[0]) for s, p in pairs)
    return {"main": 100 * acc, "metric": "accuracy (exact match)", "count": len(pairs)}


def score_anls(samples, preds, ctx) -> dict:
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    if ctx.options.get("metric") == "contains":
        return score_contains(samples, preds, ctx)
    threshold = float(ctx.options.get("threshold", 0.5))
    value = _mean(metrics.anls(p, s.target, threshold) for s, p in pairs)
    return {"main": 100 * value, "metric": "anls", "count": len(pairs)}


def score_contains(samples, preds, ctx) -> dict:
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    value = _mean(metrics.contains_match(p, s.target) for s, p in pairs)
    return {"main": 100 * value, "metric": "accuracy (answer contained, MultimodalOCR)", "count": len(pairs)}


def score_chartqa(samples, preds, ctx) -> dict:
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    variant = ctx.options.get("variant", "pix2struct")
    value = _mean(metrics.chartqa_score(p, s.target, variant=variant) for s, p in pairs)
    return {"main": 100 * value, "metric": f"relaxed_accuracy ({variant})", "count": len(pairs)}


def score_generic(samples, preds, ctx) -> dict:
    """model_vqa / LLaVAR-2's VQA file: every string metric that applies (*unverified* which one LLaVAR-2 used)."""
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    vqa = _mean(metrics.vqa_accuracy(p, s.target) for s, p in pairs)
    return {
        "main": 100 * vqa,
        "metric": "vqa_accuracy (m4c)",
        "count": len(pairs),
        "anls": 100 * _mean(metrics.anls(p, s.target) for s, p in pairs),
        "contains": 100 * _mean(metrics.contains_match(p, s.target) for s, p in pairs),
        "exact": 100
        * _mean(
            float(metrics.normalize_vqa_answer(p) in map(metrics.normalize_vqa_answer, s.target)) for s, p in pairs
        ),
    }


def read_textvqa(ctx: TaskContext, ocr: bool) -> list[Sample]:
    ann = ctx.annotations
    ctx = dataclasses.replace(ctx, annotations=None)
    samples = read_vqa(ctx, ocr=ocr)
    if ann:
        _join_answers(samples, ann)
    return samples


def read_short(ctx: TaskContext) -> list[Sample]:
    """Question + "Answer the question using a single word or phrase." (LLaVA-1.5 short-answer protocol)."""
    return read_vqa(ctx)


def read_vizwiz(ctx: TaskContext) -> list[Sample]:
    return read_vqa(ctx, suffix=(VIZWIZ_UNANSWERABLE, SHORT_ANSWER))


def read_verbatim(ctx: TaskContext) -> list[Sample]:
    return read_vqa(ctx, suffix=())


def _write_json(obj, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return path


def submit_vqav2(samples, preds, ctx, out_dir) -> str:
    """EvalAI VQAv2 upload (LLaVA's convert_vqav2_for_submission): [{"question_id", "answer"}] with answers through
    the EvalAI processor; with option ``test_questions=llava_vqav2_mscoco_test2015.jsonl`` every test2015 question
    is listed and the ones not answered (outside test-dev) get ""."""
    answers = {s.key: metrics.normalize_vqa_answer(preds[s.key]) for s in samples if s.key in preds}
    ids = [s.id for s in samples]
    if ctx.options.get("test_questions"):
        ids = [_rec_id(r, i) for i, r in enumerate(load_records(ctx.options["test_questions"]))]
    rows = [{"question_id": qid, "answer": answers.get(str(qid), "")} for qid in ids]
    return _write_json(rows, os.path.join(out_dir, "submission_vqav2.json"))


def submit_vizwiz(samples, preds, ctx, out_dir) -> str:
    """VizWiz upload (LLaVA's convert_vizwiz_for_submission): [{"image", "answer"}], EvalAI-processed answers."""
    rows = []
    for s in samples:
        if s.key not in preds:
            raise ValueError(f"VizWiz submission needs every question answered; {s.key} is missing")
        rows.append(
            {
                "image": os.path.basename(s.meta.get("image_name", "")),
                "answer": metrics.normalize_vqa_answer(preds[s.key]),
            }
        )
    return _write_json(rows, os.path.join(out_dir, "submission_vizwiz.json"))


def submit_gqa(samples, preds, ctx, out_dir) -> str:
    """GQA's eval.py input (LLaVA's convert_gqa_for_eval): [{"questionId", "prediction"}]."""
    rows = [{"questionId": s.id, "prediction": metrics.gqa_normalize(preds.get(s.key, ""))} for s in samples]
    return _write_json(rows, os.path.join(out_dir, "testdev_balanced_predictions.json"))


def submit_docvqa(samples, preds, ctx, out_dir) -> str:
    """RRC upload for DocVQA / InfographicVQA test: [{"questionId", "answer"}]."""
    rows = [{"questionId": s.id, "answer": preds.get(s.key, "")} for s in samples]
    return _write_json(rows, os.path.join(out_dir, "submission_rrc.json"))


# ----------------------------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------------------------

POPE_CATEGORIES = ("adversarial", "popular", "random")


def read_pope(ctx: TaskContext, category: str | None = None) -> list[Sample]:
    """LLaVA's llava_pope_test.jsonl (+ ``--annotations`` = the folder of coco_pope_*.json label files), a single
    coco_pope_<split>.json, or a folder of them (labels inside); parquet (lmms-lab/POPE) also works."""
    data = Path(ctx.data)
    files = sorted(data.glob("coco_pope_*.json")) if data.is_dir() and not _is_hf_dataset_dir(data) else [data]
    samples = []
    for file in files:
        sub = read_vqa(dataclasses.replace(ctx, data=str(file), annotations=None))
        guess = re.match(r"coco_pope_(\w+)\.json", file.name)
        for s in sub:
            s.meta.setdefault("category", guess.group(1) if guess else None)
        samples.extend(sub)
    if len(files) > 1:
        # ids restart at 1 in each coco_pope file: make them unique per split.
        for s in samples:
            s.id = f"{s.meta['category']}_{s.id}"
    if ctx.annotations:
        # [IMPORTANT] LLaVA's eval_pope pairs the answers of a category with the labels of coco_pope_<category>.json
        # by position, not by id: reproduced (question-file order within each category).
        by_cat = defaultdict(list)
        for s in samples:
            by_cat[s.meta.get("category")].append(s)
        for cat, subset in by_cat.items():
            label_file = Path(ctx.annotations) / f"coco_pope_{cat}.json"
            labels = [r["label"] for r in load_records(label_file)]
            if len(labels) != len(subset):
                raise ValueError(f"POPE {cat}: {len(subset)} questions but {len(labels)} labels in {label_file}")
            for s, label in zip(subset, labels):
                s.target = [label]
    if category:
        samples = [s for s in samples if s.meta.get("category") == category]
    return samples


def score_pope(samples, preds, ctx) -> dict:
    by_cat = defaultdict(list)
    for s, p in _scored(samples, preds):
        by_cat[s.meta.get("category") or "all"].append((p, s.target[0]))
    if not by_cat:
        return _no_ground_truth(samples)
    cats = {c: metrics.pope_metrics([p for p, _ in v], [label for _, label in v]) for c, v in sorted(by_cat.items())}
    return {
        "main": 100 * _mean(m["f1"] for m in cats.values()),
        "metric": "f1 (mean over splits)",
        "accuracy": 100 * _mean(m["accuracy"] for m in cats.values()),
        "splits": cats,
        "count": sum(len(v) for v in by_cat.values()),
    }


# ----------------------------------------------------------------------------------------------------------------
# MME
# ----------------------------------------------------------------------------------------------------------------


def _mme_folder_records(root: Path) -> list[dict]:
    """Questions of the MME release folder: <category>/(images|.)/<img> + (questions_answers_YN|.)/<img>.txt."""
    rows = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "questions_answers_YN").is_dir() else cat_dir
        img_dir = cat_dir / "images" if (cat_dir / "images").is_dir() else cat_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            images = [p for p in img_dir.glob(txt.stem + ".*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
            if not images:
                continue
            with open(txt, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        question, answer = line.rstrip("\n").split("\t")
                        rows.append(
                            {
                                "category": cat_dir.name,
                                "image": str(images[0]),
                                "file": txt.name,
                                "question": question,
                                "answer": answer.strip(),
                            }
                        )
    return rows


def _mme_prompt(question: str) -> str:
    # LLaVA's llava_mme.jsonl replaces MME's "Please answer yes or no." with the short-answer line (its
    # convert_answer_to_mme.py undoes exactly this to find the ground truth).
    return question.replace(MME_YES_NO, "").strip() + "\n" + SHORT_ANSWER


def read_mme(ctx: TaskContext) -> list[Sample]:
    """The MME release folder, LLaVA's llava_mme.jsonl (+ ``--annotations`` = the release folder, images from
    ``--image-folder``), or parquet (lmms-lab/MME columns question_id, question, answer, category, image)."""
    data = Path(ctx.data)
    samples = []
    if data.is_dir() and not _is_hf_dataset_dir(data) and not list(data.glob("*.parquet")):
        for r in _mme_folder_records(data):
            name = f"{r['category']}/{Path(r['image']).name}"
            samples.append(
                Sample(
                    name,
                    _mme_prompt(r["question"]),
                    r["image"],
                    r["answer"],
                    {"category": r["category"], "image_name": name},
                )
            )
        return samples
    gt = {}
    if ctx.annotations:
        for r in _mme_folder_records(Path(ctx.annotations)):
            gt[(r["category"], Path(r["file"]).stem, r["question"])] = r["answer"]
    for row, rec in enumerate(load_records(ctx.data, ctx.split)):
        qid = str(_first(rec, "question_id", "id", default=row))
        category = rec.get("category") or qid.split("/")[0]
        if "text" in rec and "question" not in rec:
            prompt = _with_suffix(rec["text"], SHORT_ANSWER)
            question = prompt.replace(SHORT_ANSWER, "").strip()
        else:
            question = str(rec["question"])
            prompt = _mme_prompt(question)
        image = _first(rec, *IMAGE_KEYS) or qid
        name = f"{category}/{Path(str(rec.get('image_name') or qid)).name}"
        target = _first(rec, "answer", "label")
        if target is None and gt:
            stem = Path(qid.split("/")[-1]).stem
            q = question if MME_YES_NO in question else question + " " + MME_YES_NO
            # The released txt files sometimes have two spaces before the sentence (convert_answer_to_mme.py).
            target = gt.get(
                (category, stem, q), gt.get((category, stem, q.replace(" " + MME_YES_NO, "  " + MME_YES_NO)))
            )
        samples.append(
            Sample(
                qid, prompt, _image_value(image, ctx.image_folder), target, {"category": category, "image_name": name}
            )
        )
    return samples


def score_mme(samples, preds, ctx) -> dict:
    records = [
        {"category": s.meta["category"], "image": s.meta["image_name"], "label": s.target, "prediction": p}
        for s, p in _scored(samples, preds)
    ]
    if not records:
        return _no_ground_truth(samples)
    out = metrics.mme_scores(records)
    return {"main": out["perception"], "metric": "perception score (acc + acc+)", "count": len(records), **out}


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice: ScienceQA, MMBench, SEED, Q-Bench
# ----------------------------------------------------------------------------------------------------------------


def _options_text(options) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def read_scienceqa(ctx: TaskContext) -> list[Sample]:
    """LLaVA's llava_test_CQM-A.json (conversations; answers from ``--annotations`` problems.json, default: next
    to the data), ScienceQA's own problems.json (+ pid_splits.json, split "test"), or parquet
    (derek-thomas/ScienceQA columns question, choices, answer, hint, image)."""
    records = load_records(ctx.data, ctx.split)
    problems = {}
    ann = _find_annotation(ctx, "problems.json")
    if ann and Path(ann).name == "problems.json" and Path(ann).resolve() != Path(ctx.data).resolve():
        with open(ann, encoding="utf-8") as f:
            problems = json.load(f)
    samples = []
    if records and "conversations" in records[0]:
        for rec in records:
            qs = rec["conversations"][0]["value"].replace("<image>", "").strip()
            prob = problems.get(str(rec["id"]))
            if prob is not None:
                target = {"answer": prob["answer"], "num_choices": len(prob["choices"])}
            else:  # the conversation's own answer ("The answer is B." / "B")
                letter = metrics.scienceqa_parse(rec["conversations"][1]["value"])
                n = len(re.findall(r"\([A-E]\)", qs)) or 5
                target = {"answer": LETTERS.index(letter), "num_choices": n} if letter != "FAILED" else None
            image = rec.get("image")
            samples.append(
                Sample(
                    rec["id"],
                    qs + "\n" + MC_SUFFIX,
                    _image_value(image, ctx.image_folder) if image else None,
                    target,
                    {"is_multimodal": image is not None},
                )
            )
        return samples
    keep = None
    splits = Path(ctx.data).parent / "pid_splits.json"
    if Path(ctx.data).name == "problems.json" and splits.exists():
        with open(splits) as f:
            keep = set(json.load(f)[ctx.split or "test"])
    for row, rec in enumerate(records):
        qid = str(_first(rec, "_key", "id", default=row))
        if keep is not None and qid not in keep:
            continue
        if "split" in rec and keep is None and ctx.split and rec["split"] != ctx.split:
            continue
        context = " ".join([str(rec.get("hint") or ""), ""]).strip() or "N/A"
        choices = list(rec["choices"])
        opts = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
        prompt = f"Context: {context}\nQuestion: {rec['question']}\nOptions: {opts}\n{MC_SUFFIX}"
        image = rec.get("image")
        if isinstance(image, str) and "_key" in rec:
            image = f"{qid}/{image}"  # ScienceQA layout: <split>/<pid>/image.png
        has_image = image is not None and not (isinstance(image, dict) and not image.get("bytes"))
        samples.append(
            Sample(
                qid,
                prompt,
                _image_value(image, ctx.image_folder) if has_image else None,
                {"answer": int(rec["answer"]), "num_choices": len(choices)},
                {"is_multimodal": has_image},
            )
        )
    return samples


def score_scienceqa(samples, preds, ctx) -> dict:
    import random

    rng = random.Random(0)
    failed = ctx.options.get("failed", "wrong")
    rows = [
        (
            s.meta.get("is_multimodal"),
            metrics.scienceqa_correct(p, s.target["answer"], s.target["num_choices"], failed, rng),
        )
        for s, p in _scored(samples, preds)
    ]
    if not rows:
        return _no_ground_truth(samples)
    img = [c for m, c in rows if m]
    return {
        "main": 100 * _mean(img) if img else 100 * _mean(c for _, c in rows),
        "metric": "IMG accuracy" if img else "accuracy",
        "accuracy": 100 * _mean(c for _, c in rows),
        "count": len(rows),
        "img_count": len(img),
    }


def read_mmbench(ctx: TaskContext, lang: str = "en") -> list[Sample]:
    """MMBench / MMBench-CN TSV (base64 images) or parquet. Rows are questions as given (the released TSVs already
    hold the circular copies, index + k * 1e6); option ``rotate=true`` builds the rotations itself (LLaVA's
    ``--all-rounds``) for files without copies."""
    records = load_records(ctx.data, ctx.split)
    images = {str(r.get("index")): r.get("image") for r in records}
    rotate = str(ctx.options.get("rotate", "false")).lower() in ("1", "true", "yes")
    suffix = MC_SUFFIX_CN if lang == "cn" else MC_SUFFIX
    samples = []
    for rec in records:
        options = []
        for letter in "ABCD":
            if letter not in rec or _is_none(rec[letter]):
                break
            options.append(str(rec[letter]))
        image = rec.get("image")
        # [IMPORTANT] VLMEvalKit TSVs store the image once: a short value is the index of the row that holds it.
        if isinstance(image, str) and len(image) <= 64 and image in images:
            image = images[image]
        index = int(float(rec["index"]))
        question = str(rec["question"])
        if not _is_none(rec.get("hint")):
            question = str(rec["hint"]) + "\n" + question
        answer = None if _is_none(rec.get("answer")) else str(rec["answer"]).strip()
        rounds = metrics.mmbench_rotations(options) if rotate else [options]
        for k, opts in enumerate(rounds):
            target = None
            if answer in LETTERS[: len(options)]:
                target = LETTERS[(LETTERS.index(answer) - k) % len(options)]
            meta = {
                "index": index,
                "round": k,
                "group": index % 1_000_000,
                "choices": dict(zip(LETTERS, opts)),
                "category": rec.get("category"),
                "l2_category": rec.get("l2-category", rec.get("l2_category")),
                "row": {key: v for key, v in rec.items() if key != "image"},
            }
            sid = f"{index}-{k}" if rotate else index
            prompt = question + "\n" + _options_text(opts) + "\n" + suffix
            samples.append(Sample(sid, prompt, _image_value(image, None), target, meta))
    return samples


def score_mmbench(samples, preds, ctx) -> dict:
    method = ctx.options.get("extract", "vlmevalkit")
    records, unparsed = [], 0
    for s, p in _scored(samples, preds):
        letter = metrics.mmbench_extract(p, s.meta["choices"], method)
        if letter is None and ctx.judge is not None:
            from .judge import judge_mcq_letter

            letter = judge_mcq_letter(ctx.judge, s.meta["row"].get("question", ""), s.meta["choices"], p)
        unparsed += letter is None
        records.append(
            {
                "group": s.meta["group"],
                "correct": letter == s.target,
                "category": s.meta["category"],
                "l2_category": s.meta["l2_category"],
            }
        )
    if not records:
        return _no_ground_truth(samples)
    out = metrics.mmbench_circular(records)
    return {"main": out.pop("accuracy"), "metric": f"circular accuracy ({method})", "unparsed": unparsed, **out}


def _xlsx_cell(ref: str, value) -> str:
    from xml.sax.saxutils import escape

    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    ):
        return f'<c r="{ref}"><v>{value}</v></c>'
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", text)
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{escape(text)}</t></is></c>'


def write_xlsx(rows: list[dict], columns: list[str], path: str) -> str:
    """A one-sheet .xlsx without openpyxl (inline strings), enough for the MMBench upload form."""
    import zipfile

    def col(i):
        name = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            name = chr(65 + r) + name
        return name

    lines = []
    for r, row in enumerate([dict(zip(columns, columns))] + rows, start=1):
        cells = "".join(_xlsx_cell(f"{col(c)}{r}", row.get(name)) for c, name in enumerate(columns))
        lines.append(f'<row r="{r}">{cells}</row>')
    sheet = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
        + "".join(lines)
        + "</sheetData></worksheet>"
    )
    ns = "http://schemas.openxmlformats.org"
    files = {
        "[Content_Types].xml": '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<Types xmlns="{ns}/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels": '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship Id="rId1" '
        f'Type="{ns}/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<workbook xmlns="{ns}/spreadsheetml/2006/main" xmlns:r="{ns}/officeDocument/2006/relationships">'
        '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship Id="rId1" '
        f'Type="{ns}/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": sheet,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed time: reruns give identical files
            z.writestr(info, text)
    return path


def submit_mmbench(samples, preds, ctx, out_dir) -> str:
    """MMBench upload (LLaVA's convert_mmbench_for_submission): the TSV rows without hint / category / source /
    image / comment / l2-category, with a ``prediction`` column inserted at position 6 (raw generated text).
    With ``rotate=true`` the round-0 answer is uploaded (the server runs its own circular evaluation)."""
    drop = {"hint", "category", "source", "image", "comment", "l2-category"}
    rows, columns = [], None
    for s in samples:
        if s.meta["round"] != 0:
            continue
        row = {k: v for k, v in s.meta["row"].items() if k not in drop}
        if columns is None:
            columns = list(row)
            columns.insert(min(6, len(columns)), "prediction")
        row["prediction"] = preds.get(s.key)
        if row.get("index") is not None:
            row["index"] = int(float(row["index"]))
        rows.append(row)
    return write_xlsx(rows, columns or ["index", "prediction"], os.path.join(out_dir, "submission_mmbench.xlsx"))


def read_seed(ctx: TaskContext) -> list[Sample]:
    """LLaVA's llava-seed-bench.jsonl (+ ``--annotations`` SEED-Bench.json for answers / types), SEED-Bench.json
    itself (image questions; images ``<data_id>`` under ``--image-folder``), or parquet (lmms-lab/SEED-Bench).
    Image questions only unless option ``all=true``."""
    keep_all = str(ctx.options.get("all", "false")).lower() in ("1", "true", "yes")
    ann = {}
    if ctx.annotations:
        for r in load_records(ctx.annotations):
            ann[str(r["question_id"])] = r
    samples = []
    for row, rec in enumerate(load_records(ctx.data, ctx.split)):
        qid = str(_first(rec, "question_id", "id", default=row))
        info = {**ann.get(qid, {}), **rec}
        if not keep_all and info.get("data_type", "image") != "image":
            continue
        if "text" in rec and "question" not in rec:
            prompt = _with_suffix(rec["text"], MC_SUFFIX)
        else:
            opts = [info[f"choice_{c}"] for c in "abcd"]
            prompt = str(info["question"]) + "\n" + _options_text(opts) + "\n" + MC_SUFFIX
        image = _first(rec, "image", "data_id", "image_path")
        target = info.get("answer")
        samples.append(
            Sample(
                info["question_id"],
                prompt,
                _image_value(image, ctx.image_folder),
                target,
                {"question_type_id": info.get("question_type_id")},
            )
        )
    return samples


def score_seed(samples, preds, ctx) -> dict:
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    per = defaultdict(list)
    for s, p in pairs:
        per[str(s.meta.get("question_type_id"))].append(metrics.seed_correct(p, s.target))
    all_ = [c for v in per.values() for c in v]
    return {
        "main": 100 * _mean(all_),
        "metric": "accuracy (exact letter)",
        "count": len(all_),
        "question_types": {k: 100 * _mean(v) for k, v in sorted(per.items())},
    }


def submit_seed(samples, preds, ctx, out_dir) -> str:
    path = os.path.join(out_dir, "submission_seed.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"question_id": s.id, "prediction": preds.get(s.key, "")}) + "\n")
    return path


def read_qbench(ctx: TaskContext) -> list[Sample]:
    """Q-Bench LLVisionQA json (img_path, question, candidates, correct_ans) as LLaVA's model_vqa_qbench prompts
    it; option ``lang=zh`` for the Chinese instruction."""
    lang = ctx.options.get("lang", "en")
    head = "\nChoose between one of the options as follows:\n" if lang == "en" else "\\在下列选项中选择一个:\n"
    samples = []
    for row, rec in enumerate(load_records(ctx.data, ctx.split)):
        message = str(rec["question"]) + head
        for letter, cand in zip(("A.", "B.", "C.", "D."), rec["candidates"]):
            message += f"{letter} {cand}\n"
        image = _first(rec, "img_path", "image")
        target = {"candidates": list(rec["candidates"]), "correct": rec.get("correct_ans")}
        samples.append(
            Sample(
                _first(rec, "id", "question_id", default=row),
                message,
                _image_value(image, ctx.image_folder),
                target if target["correct"] is not None else None,
                {"type": rec.get("type"), "concern": rec.get("concern")},
            )
        )
    return samples


def score_qbench(samples, preds, ctx) -> dict:
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    value = _mean(metrics.qbench_correct(p, s.target["candidates"], s.target["correct"]) for s, p in pairs)
    return {"main": 100 * value, "metric": "accuracy (rule-based option matching)", "count": len(pairs)}


# ----------------------------------------------------------------------------------------------------------------
# OCRBench
# ----------------------------------------------------------------------------------------------------------------


def read_ocrbench(ctx: TaskContext) -> list[Sample]:
    samples = read_vqa(ctx, suffix=())
    for s in samples:
        if s.target is not None:
            s.target = list(s.target)
    return samples


def score_ocrbench(samples, preds, ctx) -> dict:
    records = [
        {
            "type": s.meta.get("type"),
            "dataset_name": s.meta.get("dataset_name", ""),
            "answers": s.target,
            "prediction": p,
        }
        for s, p in _scored(samples, preds)
    ]
    if not records:
        return _no_ground_truth(samples)
    out = metrics.ocrbench_scores(records)
    return {"main": out["final"], "metric": "OCRBench score (/1000)", "count": len(records), **out}


# ----------------------------------------------------------------------------------------------------------------
# Judged: MM-Vet, LLaVA-Bench-in-the-Wild
# ----------------------------------------------------------------------------------------------------------------


def read_mmvet(ctx: TaskContext) -> list[Sample]:
    """LLaVA's llava-mm-vet.jsonl (+ ``--annotations`` mm-vet.json, default: next to the data) or mm-vet.json
    itself (ids "v1_N", images ``imagename`` under ``--image-folder``)."""
    ann_path = _find_annotation(ctx, "mm-vet.json")
    ann = {}
    if ann_path and Path(ann_path).resolve() != Path(ctx.data).resolve():
        with open(ann_path, encoding="utf-8") as f:
            ann = json.load(f)
    samples = []
    for _row, rec in enumerate(load_records(ctx.data, ctx.split)):
        if "_key" in rec:  # mm-vet.json
            key, info = rec["_key"], rec
            prompt, image = rec["question"], rec["imagename"]
        else:
            key = f"v1_{rec['question_id']}"
            info = ann.get(key, rec)
            prompt, image = rec.get("text", rec.get("question")), _first(rec, *IMAGE_KEYS)
        target = (
            {
                "answer": info["answer"],
                "capability": info.get("capability", []),
                "question": info.get("question", prompt),
            }
            if "answer" in info
            else None
        )
        sid = rec.get("question_id", key)
        samples.append(Sample(sid, prompt, _image_value(image, ctx.image_folder), target, {"mmvet_id": key}))
    return samples


def _judged(samples, preds, ctx, label: str, judge, summarise) -> dict:
    """Shared flow of the GPT-judged tasks: no judge configured → a note instead of a score."""
    pairs = _scored(samples, preds)
    if not pairs:
        return _no_ground_truth(samples)
    if ctx.judge is None:
        return {
            "main": None,
            "metric": f"{label} (judge not configured)",
            "count": len(pairs),
            "note": "set INTERNVL_JUDGE_BASE_URL / _MODEL / _API_KEY (or OPENAI_*) to score",
        }
    records = judge(ctx.judge, pairs)
    return {"count": len(records), "judge_model": ctx.judge.model, **summarise(records)}


def score_mmvet(samples, preds, ctx) -> dict:
    from .judge import judge_mmvet

    def summarise(records):
        out = metrics.mmvet_scores(records)
        return {"main": out["total"], "metric": "mm-vet total (judge)", **out}

    return _judged(samples, preds, ctx, "mm-vet", judge_mmvet, summarise)


def submit_mmvet(samples, preds, ctx, out_dir) -> str:
    """The MM-Vet evaluator's input (LLaVA's convert_mmvet_for_eval): {"v1_<id>": answer}."""
    rows = {s.meta["mmvet_id"]: preds.get(s.key, "") for s in samples}
    path = os.path.join(out_dir, "mmvet_results.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2, ensure_ascii=False)
    return path


def read_llava_bench(ctx: TaskContext) -> list[Sample]:
    """questions.jsonl (question_id, image, text, category) + context.jsonl and answers_gpt4.jsonl from
    ``--annotations`` (a folder; default: the data's folder)."""
    base = Path(ctx.annotations) if ctx.annotations else Path(ctx.data).parent
    contexts, refs = {}, {}
    if (base / "context.jsonl").exists():
        contexts = {r["image"]: r for r in load_records(base / "context.jsonl")}
    if (base / "answers_gpt4.jsonl").exists():
        refs = {str(r["question_id"]): r for r in load_records(base / "answers_gpt4.jsonl")}
    samples = []
    for _row, rec in enumerate(load_records(ctx.data, ctx.split)):
        qid = str(rec["question_id"])
        target = None
        if qid in refs and rec.get("image") in contexts:
            target = {
                "reference": refs[qid]["text"],
                "reference_id": refs[qid].get("answer_id", qid),
                "caption": contexts[rec["image"]]["caption"],
                "question": rec["text"],
            }
        samples.append(
            Sample(
                rec["question_id"],
                rec["text"],
                _image_value(rec.get("image"), ctx.image_folder),
                target,
                {"category": rec.get("category")},
            )
        )
    return samples


def score_llava_bench(samples, preds, ctx) -> dict:
    from .judge import judge_llava_bench

    def summarise(records):
        out = metrics.llava_bench_scores(records)
        return {"main": out["all"], "metric": "relative score vs reference (judge)", "categories": out}

    return _judged(samples, preds, ctx, "llava-bench", judge_llava_bench, summarise)


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------


def _t(name, family, description, read, score, **kwargs) -> Task:
    return Task(name, family, description, read, score, **kwargs)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _t("vqav2", "vqa", "VQAv2 (LLaVA jsonl; val with --annotations, test-dev -> EvalAI file)", read_short,
           lambda s, p, c: score_vqa(s, p, c, "vqa_eval"), submission=submit_vqav2, reference_key="vqav2"),
        _t("gqa", "vqa", "GQA testdev-balanced (answers from --annotations questions json)", read_short, score_gqa,
           submission=submit_gqa, reference_key="gqa"),
        _t("vizwiz", "vqa", "VizWiz-VQA (test -> EvalAI file)", read_vizwiz,
           lambda s, p, c: score_vqa(s, p, c, "vqa_eval"), submission=submit_vizwiz, reference_key="vizwiz"),
        _t("textvqa", "vqa", "TextVQA val with LLaVA's 'Reference OCR token' lines", lambda c: read_textvqa(c, True),
           score_vqa, reference_key="textvqa"),
        _t("textvqa_no_ocr", "vqa", "TextVQA val without OCR tokens", lambda c: read_textvqa(c, False), score_vqa,
           reference_key="textvqa"),
        _t("pope", "pope", "POPE (all splits present; mean F1)", read_pope, score_pope, reference_key="pope"),
        *[
            _t(f"pope_{cat}", "pope", f"POPE {cat} split", lambda c, cat=cat: read_pope(c, cat), score_pope)
            for cat in POPE_CATEGORIES
        ],
        _t("mme", "mme", "MME (perception / cognition, acc + acc+)", read_mme, score_mme, reference_key="mme"),
        _t("scienceqa", "mcq", "ScienceQA test (IMG accuracy)", read_scienceqa, score_scienceqa, max_new_tokens=1024,
           reference_key="scienceqa"),
        _t("mmbench", "mcq", "MMBench (circular; test -> upload xlsx)", lambda c: read_mmbench(c, "en"),
           score_mmbench, max_new_tokens=1024, submission=submit_mmbench, reference_key="mmbench"),
        _t("mmbench_cn", "mcq", "MMBench-CN (circular; test -> upload xlsx)", lambda c: read_mmbench(c, "cn"),
           score_mmbench, max_new_tokens=1024, submission=submit_mmbench, reference_key="mmbench_cn"),
        _t("seed", "mcq", "SEED-Bench image questions", read_seed, score_seed, submission=submit_seed,
           reference_key="seed"),
        _t("qbench", "mcq", "Q-Bench LLVisionQA", read_qbench, score_qbench, max_new_tokens=1024),
        _t("mmvet", "judged", "MM-Vet (judged)", read_mmvet, score_mmvet, max_new_tokens=1024, judged=True,
           submission=submit_mmvet, reference_key="mmvet"),
        _t("llava_bench", "judged", "LLaVA-Bench-in-the-Wild (judged)", read_llava_bench, score_llava_bench,
           max_new_tokens=1024, judged=True, reference_key="llava_bench"),
        _t("ocrbench", "ocr", "OCRBench (score /1000)", read_ocrbench, score_ocrbench, reference_key="ocrbench"),
        _t("stvqa", "ocr", "ST-VQA (ANLS)", read_short, score_anls, reference_key="stvqa"),
        _t("docvqa", "ocr", "DocVQA (ANLS; test -> RRC file)", read_short, score_anls, submission=submit_docvqa,
           reference_key="docvqa"),
        _t("infovqa", "ocr", "InfographicVQA (ANLS; test -> RRC file)", read_short, score_anls,
           submission=submit_docvqa, reference_key="infovqa"),
        _t("chartqa", "ocr", "ChartQA (relaxed accuracy)", read_short, score_chartqa, reference_key="chartqa"),
        _t("funsd", "ocr", "FUNSD key-value questions (containment accuracy)", read_verbatim, score_contains,
           reference_key="funsd"),
        _t("sroie", "ocr", "SROIE key-value questions (containment accuracy)", read_verbatim, score_contains,
           reference_key="sroie"),
        _t("llavar2_vqa", "vqa", "LLaVAR-2's own VQA test file (question file with answers)", read_verbatim,
           score_generic),
        _t("model_vqa", "generic", "any LLaVA question file (prompts verbatim; scored if answers present)",
           read_verbatim, score_generic),
    ]
}  # fmt: skip


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]

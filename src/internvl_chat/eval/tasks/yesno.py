"""Yes/no benchmarks: POPE (splits, F1) and MME (perception / cognition, acc + acc+)."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path

from .. import metrics
from .base import MME_YES_NO, SHORT_ANSWER, Sample, TaskContext, mean, no_ground_truth, scored
from .files import IMAGE_KEYS, first, image_value, is_saved_dataset, load_records, with_suffix
from .vqa import read_vqa

POPE_CATEGORIES = ("adversarial", "popular", "random")


def read_pope(ctx: TaskContext, category: str | None = None) -> list[Sample]:
    """LLaVA's llava_pope_test.jsonl (+ ``--annotations`` = the folder of coco_pope_*.json label files), a single
    coco_pope_<split>.json, or a folder of them (labels inside); parquet (lmms-lab/POPE) also works."""
    data = Path(ctx.data)
    files = sorted(data.glob("coco_pope_*.json")) if data.is_dir() and not is_saved_dataset(data) else [data]
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
    for s, p in scored(samples, preds):
        by_cat[s.meta.get("category") or "all"].append((p, s.target[0]))
    if not by_cat:
        return no_ground_truth(samples)
    cats = {c: metrics.pope_metrics([p for p, _ in v], [label for _, label in v]) for c, v in sorted(by_cat.items())}
    return {
        "main": 100 * mean(m["f1"] for m in cats.values()),
        "metric": "f1 (mean over splits)",
        "accuracy": 100 * mean(m["accuracy"] for m in cats.values()),
        "splits": cats,
        "count": sum(len(v) for v in by_cat.values()),
    }


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
    if data.is_dir() and not is_saved_dataset(data) and not list(data.glob("*.parquet")):
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
        qid = str(first(rec, "question_id", "id", default=row))
        category = rec.get("category") or qid.split("/")[0]
        if "text" in rec and "question" not in rec:
            prompt = with_suffix(rec["text"], SHORT_ANSWER)
            question = prompt.replace(SHORT_ANSWER, "").strip()
        else:
            question = str(rec["question"])
            prompt = _mme_prompt(question)
        image = first(rec, *IMAGE_KEYS) or qid
        name = f"{category}/{Path(str(rec.get('image_name') or qid)).name}"
        target = first(rec, "answer", "label")
        if target is None and gt:
            stem = Path(qid.split("/")[-1]).stem
            q = question if MME_YES_NO in question else question + " " + MME_YES_NO
            # The released txt files sometimes have two spaces before the sentence (convert_answer_to_mme.py).
            target = gt.get(
                (category, stem, q), gt.get((category, stem, q.replace(" " + MME_YES_NO, "  " + MME_YES_NO)))
            )
        samples.append(
            Sample(
                qid, prompt, image_value(image, ctx.image_folder), target, {"category": category, "image_name": name}
            )
        )
    return samples


def score_mme(samples, preds, ctx) -> dict:
    records = [
        {"category": s.meta["category"], "image": s.meta["image_name"], "label": s.target, "prediction": p}
        for s, p in scored(samples, preds)
    ]
    if not records:
        return no_ground_truth(samples)
    out = metrics.mme_scores(records)
    return {"main": out["perception"], "metric": "perception score (acc + acc+)", "count": len(records), **out}

"""Judged benchmarks: MM-Vet and LLaVA-Bench-in-the-Wild (free-form answers graded by a judge model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import metrics
from .base import Sample, TaskContext, no_ground_truth, scored
from .files import IMAGE_KEYS, find_annotation, first, image_value, load_records


def read_mmvet(ctx: TaskContext) -> list[Sample]:
    """LLaVA's llava-mm-vet.jsonl (+ ``--annotations`` mm-vet.json, default: next to the data) or mm-vet.json
    itself (ids "v1_N", images ``imagename`` under ``--image-folder``)."""
    ann_path = find_annotation(ctx, "mm-vet.json")
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
            prompt, image = rec.get("text", rec.get("question")), first(rec, *IMAGE_KEYS)
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
        samples.append(Sample(sid, prompt, image_value(image, ctx.image_folder), target, {"mmvet_id": key}))
    return samples


def _judged(samples, preds, ctx, label: str, judge, summarise) -> dict:
    """Shared flow of the GPT-judged tasks: no judge configured → a note instead of a score."""
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    if ctx.judge is None:
        return {
            "main": None,
            "metric": f"{label} (judge not configured)",
            "count": len(pairs),
            "note": "set INTERNVL_JUDGE_BASE_URL / _MODEL / _API_KEY (or OPENAI_*) to score",
        }
    records = judge(ctx.judge, pairs)
    return {"count": len(records), "judge_model": ctx.judge.model, **summarise(records)}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def score_mmvet(samples, preds, ctx) -> dict:
    """MM-Vet as its evaluator: total, capability and capability-integration tables (1 decimal), plus its grade
    file and the two CSV tables in the task folder, named as the evaluator names them for ``mmvet_results.json``."""
    from ..judge import judge_mmvet

    def summarise(records):
        out = metrics.mmvet_scores(records)
        files = {}
        if ctx.output:
            files = _write_mmvet_files(records, out, ctx.output, ctx.judge.model)
        fallbacks = [r["mmvet_id"] for r in records if r["fallback"]]
        return {
            "main": out["total"],
            "metric": "mm-vet total (judge; MM-Vet evaluator rounding)",
            **out,
            "judge_fallbacks": len(fallbacks),
            "judge_fallback_items": fallbacks,
            "judge_reasked": sum(1 for r in records if r["tries"] > 1),
            "files": files,
        }

    return _judged(samples, preds, ctx, "mm-vet", judge_mmvet, summarise)


def _write_mmvet_files(records, out: dict, folder: str, judge_model: str) -> dict:
    """The evaluator's ``<results>_<judge>-grade-1runs.json`` ({id: {"model", "content", "score"} lists of one
    run}) and ``-cap-score-1runs.csv`` / ``-cap-int-score-1runs.csv`` tables (one row, the results file's name)."""
    import pandas as pd

    stem = f"mmvet_results_{_safe(judge_model)}"
    grades = {
        r["mmvet_id"]: {"model": [r["model"]], "content": [r["content"]], "score": [r["score"]]} for r in records
    }
    paths = {
        "grades": os.path.join(folder, f"{stem}-grade-1runs.json"),
        "capabilities": os.path.join(folder, f"{stem}-cap-score-1runs.csv"),
        "capability_integration": os.path.join(folder, f"{stem}-cap-int-score-1runs.csv"),
    }
    os.makedirs(folder, exist_ok=True)
    with open(paths["grades"], "w", encoding="utf-8") as f:
        json.dump(grades, f, indent=4)
    extra = {"total": out["total"], "std": 0.0, "runs": str([out["total"]])}
    for key in ("capabilities", "capability_integration"):
        pd.DataFrame([{**out[key], **extra}], index=["mmvet_results"]).to_csv(paths[key])
    return paths


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
                "reference_id": refs[qid].get("answer_id", refs[qid]["question_id"]),
                "caption": contexts[rec["image"]]["caption"],
                "question": rec["text"],
            }
        samples.append(
            Sample(
                rec["question_id"],
                rec["text"],
                image_value(rec.get("image"), ctx.image_folder),
                target,
                {"category": rec.get("category")},
            )
        )
    return samples


def score_llava_bench(samples, preds, ctx) -> dict:
    """LLaVA-Bench as LLaVA's summarize_gpt_review: relative score per category (means rounded to 3 decimals
    first) and the absolute scores it prints; the review file as eval_gpt_review_bench writes it."""
    from ..judge import judge_llava_bench

    def summarise(records):
        out = metrics.llava_bench_scores(records)
        result = {
            "main": out["all"]["relative"],
            "metric": "relative score vs reference (judge; LLaVA summarize_gpt_review)",
            "categories": {k: v["relative"] for k, v in out.items()},
            "absolute": {k: {"reference": v["reference"], "model": v["model"]} for k, v in out.items()},
            "judge_unparsed": sum(1 for r in records if list(r["tuple"]) == [-1.0, -1.0]),
        }
        if ctx.output:
            result["reviews"] = _write_reviews(records, samples, ctx)
        return result

    return _judged(samples, preds, ctx, "llava-bench", judge_llava_bench, summarise)


def _write_reviews(records, samples, ctx) -> str:
    """``reviews_<judge>.jsonl`` in eval_gpt_review_bench's layout (id, question_id, answer1_id, answer2_id,
    category "llava_bench_<c>", content, tuple), readable by LLaVA's summarize_gpt_review.py."""
    by_key = {s.key: s for s in samples}
    path = os.path.join(ctx.output, f"reviews_{_safe(ctx.judge.model)}.jsonl")
    os.makedirs(ctx.output, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            s = by_key[r["id"]]
            answer = ctx.answers.get(s.key, {})
            row = {
                "id": i + 1,
                "question_id": s.id,
                "answer1_id": s.target["reference_id"],
                "answer2_id": answer.get("answer_id", s.id),
                "category": f"llava_bench_{r['category']}",
                "content": r["content"],
                "tuple": r["tuple"],
            }
            f.write(json.dumps(row) + "\n")
    return path

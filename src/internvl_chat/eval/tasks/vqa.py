"""Short-answer VQA family: VQAv2, GQA, VizWiz, TextVQA, DocVQA, InfoVQA, ST-VQA, ChartQA, LLaVA question files;
their readers, scorers and upload files."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from .. import metrics
from .base import OCR_PREFIX, SHORT_ANSWER, VIZWIZ_UNANSWERABLE, Sample, TaskContext, mean, no_ground_truth, scored
from .files import IMAGE_KEYS, answers_of, first, image_value, load_records, record_id, with_suffix, write_json

logger = logging.getLogger(__name__)


def read_vqa(ctx: TaskContext, suffix: tuple[str, ...] = (SHORT_ANSWER,), ocr: bool | None = None) -> list[Sample]:
    """Generic reader: ``text`` (LLaVA file, suffix kept/added) or ``question`` / ``query`` + suffix; ground truth
    from ``answers`` / ``answer`` / ``label`` or joined from ``ctx.annotations`` by question id (then image)."""
    samples = []
    for row, rec in enumerate(load_records(ctx.data, ctx.split)):
        image = first(rec, *IMAGE_KEYS)
        if image is None and first(rec, "image_id", "imageId") is not None:
            image = f"{first(rec, 'image_id', 'imageId')}.jpg"  # TextVQA / GQA raw files name images by id
        text = rec.get("text") if "question" not in rec and "query" not in rec else None
        if text is not None:
            lines = text.split("\n")
            if ocr is False:
                lines = [line for line in lines if not line.startswith(OCR_PREFIX)]
            question = next((line for line in lines if not line.startswith(OCR_PREFIX)), lines[0])
            prompt = with_suffix("\n".join(lines), *suffix)
        else:
            question = str(first(rec, "question", "query", "prompt", default=""))
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
        sample_name = _sample_name(rec.get("metadata"))
        if sample_name is not None:
            meta["sample_name"] = sample_name  # the document of a key-value question (LayTextLLM files)
        samples.append(
            Sample(record_id(rec, row), prompt, image_value(image, ctx.image_folder), answers_of(rec), meta)
        )
    if ctx.annotations:
        _join_answers(samples, ctx.annotations, ctx.split)
    return samples


def _sample_name(metadata):
    """``sample_name`` of a record's ``metadata`` (a dict or a JSON string), if any."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            return None
    return metadata.get("sample_name") if isinstance(metadata, dict) else None


def _join_answers(samples: list[Sample], path: str, split: str | None = None) -> None:
    """Fills ``target`` from an annotation file keyed by question id, else by image name (VizWiz), else by
    (image id, lower-cased question) as LLaVA's eval_textvqa does."""
    records = load_records(path, split)
    by_id, by_image, by_question = {}, {}, {}
    for rec in records:
        answers = answers_of(rec)
        if answers is None:
            continue
        rid = first(rec, "question_id", "questionId", "id", "_key")
        if rid is not None:  # never by row number: VizWiz annotations have no id and must join by image
            by_id[str(rid)] = answers
        image = first(rec, *IMAGE_KEYS)
        if isinstance(image, str):
            by_image[os.path.basename(image)] = answers
        if rec.get("question") is not None and first(rec, "image_id", "imageId") is not None:
            by_question[(str(first(rec, "image_id", "imageId")), str(rec["question"]).lower())] = answers
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


def score_vqa(samples, preds, ctx, protocol: str | None = None) -> dict:
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    protocol = ctx.options.get("protocol", protocol or "m4c")
    acc = mean(metrics.vqa_accuracy(p, s.target, protocol=protocol) for s, p in pairs)
    return {"main": 100 * acc, "metric": f"vqa_accuracy ({protocol})", "count": len(pairs)}


def read_gqa(ctx: TaskContext) -> list[Sample]:
    """The short-answer reader plus each question's structural type (``types.structural`` of the ``--annotations``
    questions json), which GQA's eval.py splits into binary and open questions."""
    samples = read_vqa(ctx)
    if ctx.annotations:
        types = {}
        for rec in load_records(ctx.annotations, ctx.split):
            rid = first(rec, "questionId", "question_id", "id", "_key")
            structural = (rec.get("types") or {}).get("structural") if isinstance(rec.get("types"), dict) else None
            if rid is not None and structural is not None:
                types[str(rid)] = structural
        for s in samples:
            if s.key in types:
                s.meta["structural"] = types[s.key]
    return samples


def score_gqa(samples, preds, ctx) -> dict:
    """GQA eval.py: exact-match accuracy, with the binary / open accuracies when the structural types are known."""
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    out = metrics.gqa_scores(
        {"prediction": p, "answer": s.target[0], "structural": s.meta.get("structural")} for s, p in pairs
    )
    return {
        "main": out["accuracy"],
        "metric": "accuracy (exact match)",
        "count": len(pairs),
        "binary": out["binary"],
        "open": out["open"],
    }


def score_anls(samples, preds, ctx) -> dict:
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    if ctx.options.get("metric") == "contains":
        return score_contains(samples, preds, ctx)
    threshold = float(ctx.options.get("threshold", 0.5))
    value = mean(metrics.anls(p, s.target, threshold) for s, p in pairs)
    return {"main": 100 * value, "metric": "anls", "count": len(pairs)}


def score_contains(samples, preds, ctx) -> dict:
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    value = mean(metrics.contains_match(p, s.target) for s, p in pairs)
    return {"main": 100 * value, "metric": "accuracy (answer contained, MultimodalOCR)", "count": len(pairs)}


def score_chartqa(samples, preds, ctx) -> dict:
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    variant = ctx.options.get("variant", "pix2struct")
    value = mean(metrics.chartqa_score(p, s.target, variant=variant) for s, p in pairs)
    return {"main": 100 * value, "metric": f"relaxed_accuracy ({variant})", "count": len(pairs)}


def score_generic(samples, preds, ctx) -> dict:
    """model_vqa / LLaVAR-2's VQA file: every string metric that applies (*unverified* which one LLaVAR-2 used)."""
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    vqa = mean(metrics.vqa_accuracy(p, s.target) for s, p in pairs)
    return {
        "main": 100 * vqa,
        "metric": "vqa_accuracy (m4c)",
        "count": len(pairs),
        "anls": 100 * mean(metrics.anls(p, s.target) for s, p in pairs),
        "contains": 100 * mean(metrics.contains_match(p, s.target) for s, p in pairs),
        "exact": 100
        * mean(
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


def submit_vqav2(samples, preds, ctx, out_dir) -> str:
    """EvalAI VQAv2 upload (LLaVA's convert_vqav2_for_submission): [{"question_id", "answer"}] with answers through
    the EvalAI processor; with option ``test_questions=llava_vqav2_mscoco_test2015.jsonl`` every test2015 question
    is listed and the ones not answered (outside test-dev) get ""."""
    answers = {s.key: metrics.normalize_vqa_answer(preds[s.key]) for s in samples if s.key in preds}
    ids = [s.id for s in samples]
    if ctx.options.get("test_questions"):
        ids = [record_id(r, i) for i, r in enumerate(load_records(ctx.options["test_questions"]))]
    rows = [{"question_id": qid, "answer": answers.get(str(qid), "")} for qid in ids]
    return write_json(rows, os.path.join(out_dir, "submission_vqav2.json"))


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
    return write_json(rows, os.path.join(out_dir, "submission_vizwiz.json"))


def submit_gqa(samples, preds, ctx, out_dir) -> str:
    """GQA's eval.py input (LLaVA's convert_gqa_for_eval): [{"questionId", "prediction"}]."""
    rows = [{"questionId": s.id, "prediction": metrics.gqa_normalize(preds.get(s.key, ""))} for s in samples]
    return write_json(rows, os.path.join(out_dir, "testdev_balanced_predictions.json"))


def submit_docvqa(samples, preds, ctx, out_dir) -> str:
    """RRC upload for DocVQA / InfographicVQA test: [{"questionId", "answer"}]."""
    rows = [{"questionId": s.id, "answer": preds.get(s.key, "")} for s in samples]
    return write_json(rows, os.path.join(out_dir, "submission_rrc.json"))

"""OCR benchmarks: OCRBench (/1000), FUNSD / SROIE key-value questions (containment accuracy or key-value F1)."""

from __future__ import annotations

from .. import metrics
from .base import Sample, TaskContext, mean, no_ground_truth, scored
from .vqa import read_vqa


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
        for s, p in scored(samples, preds)
    ]
    if not records:
        return no_ground_truth(samples)
    out = metrics.ocrbench_scores(records)
    return {"main": out["final"], "metric": "OCRBench score (/1000)", "count": len(records), **out}


def score_kv(samples, preds, ctx, dataset: str) -> dict:
    """FUNSD / SROIE key-value questions. Two conventions, both reported; ``main`` is picked by option ``metric``:
    ``contains`` (default: the MultimodalOCR / OCRBench containment accuracy) or ``fscore`` (LayTextLLM's
    ``evalFscore`` key-value micro-F1, the LLaVAR-2 / LayTextLLM convention). For the F1 a question's document is
    its ``metadata.sample_name`` (else its image) and its field is cut from the question as LayTextLLM does."""
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    choice = ctx.options.get("metric", "contains")
    if choice not in ("contains", "fscore"):
        raise ValueError(f"--option metric={choice!r}: {dataset} takes metric=contains or metric=fscore")
    contains = 100 * mean(metrics.contains_match(p, s.target) for s, p in pairs)
    kv = metrics.kv_fscore(
        {
            "doc": str(s.meta.get("sample_name") or s.meta.get("image_name") or s.key),
            "field": metrics.kv_field(s.meta.get("question", ""), dataset),
            "answers": list(s.target),
            "prediction": p,
        }
        for s, p in pairs
    )
    fscore = {k: (100 * v if k in ("precision", "recall", "f1") else v) for k, v in kv.items()}
    conventions = {
        "contains": "accuracy (answer contained; MultimodalOCR / OCRBench convention)",
        "fscore": "key-value micro-F1 (LayTextLLM evalFscore; LLaVAR-2 / LayTextLLM convention)",
    }
    return {
        "main": contains if choice == "contains" else fscore["f1"],
        "metric": conventions[choice],
        "count": len(pairs),
        "contains": contains,
        "fscore": fscore,
        "conventions": conventions,
    }

"""The benchmark registry (a plain dict, one `Task` row per benchmark) over the per-family modules.

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
  Q-Bench json, MME folder, SEED-Bench.json) -- prompts are then built with the LLaVA-1.5 protocol suffixes.
* MMBench / MMBench-CN TSVs with base64 images (VLMEvalKit's short "image" references to another row resolved).
* Parquet files, folders of parquet files and ``datasets.save_to_disk`` folders (image columns as ``{"bytes"}``
  dicts or PIL images), with the same column names as the Hub copies (lmms-lab / HuggingFaceM4 layouts).

Modules: `base` (Sample, TaskContext, Task, prompt lines), `files` (shared file I/O: records, images, JSON / XLSX
writers) and one module per benchmark family: `vqa`, `yesno` (POPE, MME), `mcq` (ScienceQA, MMBench, SEED, Q-Bench),
`ocr` (OCRBench, FUNSD, SROIE), `judged` (MM-Vet, LLaVA-Bench). Adding a benchmark is one ``Task(...)`` row in
``TASKS``.
"""

from __future__ import annotations

from ..judge import DEFAULT_JUDGES
from .base import (
    LETTERS,
    MC_SUFFIX,
    MC_SUFFIX_CN,
    MME_YES_NO,
    OCR_PREFIX,
    SHORT_ANSWER,
    VIZWIZ_UNANSWERABLE,
    Sample,
    Task,
    TaskContext,
    ensure_unique_keys,
)
from .files import load_records
from .judged import read_llava_bench, read_mmvet, score_llava_bench, score_mmvet, submit_mmvet
from .mcq import (
    read_mmbench,
    read_qbench,
    read_scienceqa,
    read_seed,
    score_mmbench,
    score_qbench,
    score_scienceqa,
    score_seed,
    submit_mmbench,
    submit_seed,
)
from .ocr import read_ocrbench, score_kv, score_ocrbench
from .vqa import (
    read_gqa,
    read_short,
    read_textvqa,
    read_verbatim,
    read_vizwiz,
    score_anls,
    score_chartqa,
    score_generic,
    score_gqa,
    score_vqa,
    submit_docvqa,
    submit_gqa,
    submit_vizwiz,
    submit_vqav2,
)
from .yesno import POPE_CATEGORIES, read_mme, read_pope, score_mme, score_pope

__all__ = [
    "LETTERS",
    "MC_SUFFIX",
    "MC_SUFFIX_CN",
    "MME_YES_NO",
    "OCR_PREFIX",
    "SHORT_ANSWER",
    "TASKS",
    "VIZWIZ_UNANSWERABLE",
    "Sample",
    "Task",
    "TaskContext",
    "ensure_unique_keys",
    "get_task",
    "load_records",
]


def _t(name, family, description, read, score, **kwargs) -> Task:
    return Task(name, family, description, read, score, **kwargs)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _t("vqav2", "vqa", "VQAv2 (LLaVA jsonl; val with --annotations, test-dev -> EvalAI file)", read_short,
           lambda s, p, c: score_vqa(s, p, c, "vqa_eval"), submission=submit_vqav2, reference_key="vqav2"),
        _t("gqa", "vqa", "GQA testdev-balanced (answers from --annotations questions json)", read_gqa, score_gqa,
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
           score_mmbench, max_new_tokens=1024, submission=submit_mmbench, reference_key="mmbench",
           judge_model=DEFAULT_JUDGES["mmbench"]),
        _t("mmbench_cn", "mcq", "MMBench-CN (circular; test -> upload xlsx)", lambda c: read_mmbench(c, "cn"),
           score_mmbench, max_new_tokens=1024, submission=submit_mmbench, reference_key="mmbench_cn",
           judge_model=DEFAULT_JUDGES["mmbench"]),
        _t("seed", "mcq", "SEED-Bench image questions", read_seed, score_seed, submission=submit_seed,
           reference_key="seed"),
        _t("qbench", "mcq", "Q-Bench LLVisionQA", read_qbench, score_qbench, max_new_tokens=1024),
        _t("mmvet", "judged", "MM-Vet (judged; default judge gpt-4-0613)", read_mmvet, score_mmvet,
           max_new_tokens=1024, judged=True, judge_model=DEFAULT_JUDGES["mmvet"],
           submission=submit_mmvet, reference_key="mmvet"),
        _t("llava_bench", "judged", "LLaVA-Bench-in-the-Wild (judged; default judge gpt-4-0314)", read_llava_bench,
           score_llava_bench, max_new_tokens=1024, judged=True, judge_model=DEFAULT_JUDGES["llava_bench"],
           reference_key="llava_bench"),
        _t("ocrbench", "ocr", "OCRBench (score /1000)", read_ocrbench, score_ocrbench, reference_key="ocrbench"),
        _t("stvqa", "ocr", "ST-VQA (ANLS)", read_short, score_anls, reference_key="stvqa"),
        _t("docvqa", "ocr", "DocVQA (ANLS; test -> RRC file)", read_short, score_anls, submission=submit_docvqa,
           reference_key="docvqa"),
        _t("infovqa", "ocr", "InfographicVQA (ANLS; test -> RRC file)", read_short, score_anls,
           submission=submit_docvqa, reference_key="infovqa"),
        _t("chartqa", "ocr", "ChartQA (relaxed accuracy)", read_short, score_chartqa, reference_key="chartqa"),
        _t("funsd", "ocr", "FUNSD key-value questions (containment accuracy; option metric=fscore)", read_verbatim,
           lambda s, p, c: score_kv(s, p, c, "funsd"),
           reference_key="funsd"),
        _t("sroie", "ocr", "SROIE key-value questions (containment accuracy; option metric=fscore)", read_verbatim,
           lambda s, p, c: score_kv(s, p, c, "sroie"),
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

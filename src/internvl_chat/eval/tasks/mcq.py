"""Multiple choice: ScienceQA, MMBench / MMBench-CN (circular; upload xlsx), SEED-Bench, Q-Bench."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

from .. import metrics
from .base import LETTERS, MC_SUFFIX, MC_SUFFIX_CN, Sample, TaskContext, mean, no_ground_truth, option_on, scored
from .files import find_annotation, first, image_value, is_none, load_records, with_suffix, write_xlsx


def _options_text(options) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def read_scienceqa(ctx: TaskContext) -> list[Sample]:
    """LLaVA's llava_test_CQM-A.json (conversations; answers from ``--annotations`` problems.json, default: next
    to the data), ScienceQA's own problems.json (+ pid_splits.json, split "test"), or parquet
    (derek-thomas/ScienceQA columns question, choices, answer, hint, image)."""
    records = load_records(ctx.data, ctx.split)
    problems = {}
    ann = find_annotation(ctx, "problems.json")
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
                    image_value(image, ctx.image_folder) if image else None,
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
        qid = str(first(rec, "_key", "id", default=row))
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
                image_value(image, ctx.image_folder) if has_image else None,
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
        for s, p in scored(samples, preds)
    ]
    if not rows:
        return no_ground_truth(samples)
    img = [c for m, c in rows if m]
    return {
        "main": 100 * mean(img) if img else 100 * mean(c for _, c in rows),
        "metric": "IMG accuracy" if img else "accuracy",
        "accuracy": 100 * mean(c for _, c in rows),
        "count": len(rows),
        "img_count": len(img),
    }


def read_mmbench(ctx: TaskContext, lang: str = "en") -> list[Sample]:
    """MMBench / MMBench-CN TSV (base64 images) or parquet. Rows are questions as given (the released TSVs already
    hold the circular copies, index + k * 1e6); option ``rotate=true`` builds the rotations itself (LLaVA's
    ``--all-rounds``) for files without copies."""
    records = load_records(ctx.data, ctx.split)
    images = {str(r.get("index")): r.get("image") for r in records}
    rotate = option_on(ctx, "rotate")
    suffix = MC_SUFFIX_CN if lang == "cn" else MC_SUFFIX
    samples = []
    for rec in records:
        options = []
        for letter in "ABCD":
            if letter not in rec or is_none(rec[letter]):
                break
            options.append(str(rec[letter]))
        image = rec.get("image")
        # [IMPORTANT] VLMEvalKit TSVs store the image once: a short value is the index of the row that holds it.
        if isinstance(image, str) and len(image) <= 64 and image in images:
            image = images[image]
        index = int(float(rec["index"]))
        question = str(rec["question"])
        if not is_none(rec.get("hint")):
            question = str(rec["hint"]) + "\n" + question
        answer = None if is_none(rec.get("answer")) else str(rec["answer"]).strip()
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
            samples.append(Sample(sid, prompt, image_value(image, None), target, meta))
    return samples


def score_mmbench(samples, preds, ctx) -> dict:
    method = ctx.options.get("extract", "vlmevalkit")
    verbose = option_on(ctx, "verbose")
    records, unparsed, asked = [], 0, 0
    for s, p in scored(samples, preds):
        letter = metrics.mmbench_extract(p, s.meta["choices"], method, verbose=verbose)
        if letter is None and ctx.judge is not None:
            asked += 1
            from ..judge import judge_mcq_letter

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
        return no_ground_truth(samples)
    out = metrics.mmbench_circular(records)
    result = {"main": out.pop("accuracy"), "metric": f"circular accuracy ({method})", "unparsed": unparsed, **out}
    if ctx.judge is not None:
        result.update(judge_model=ctx.judge.model, judge_asked=asked)
    return result


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
    keep_all = option_on(ctx, "all")
    ann = {}
    if ctx.annotations:
        for r in load_records(ctx.annotations):
            ann[str(r["question_id"])] = r
    samples = []
    for row, rec in enumerate(load_records(ctx.data, ctx.split)):
        qid = str(first(rec, "question_id", "id", default=row))
        info = {**ann.get(qid, {}), **rec}
        if not keep_all and info.get("data_type", "image") != "image":
            continue
        if "text" in rec and "question" not in rec:
            prompt = with_suffix(rec["text"], MC_SUFFIX)
        else:
            opts = [info[f"choice_{c}"] for c in "abcd"]
            prompt = str(info["question"]) + "\n" + _options_text(opts) + "\n" + MC_SUFFIX
        image = first(rec, "image", "data_id", "image_path")
        target = info.get("answer")
        samples.append(
            Sample(
                info["question_id"],
                prompt,
                image_value(image, ctx.image_folder),
                target,
                {"question_type_id": info.get("question_type_id")},
            )
        )
    return samples


def score_seed(samples, preds, ctx) -> dict:
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    per = defaultdict(list)
    for s, p in pairs:
        per[str(s.meta.get("question_type_id"))].append(metrics.seed_correct(p, s.target))
    all_ = [c for v in per.values() for c in v]
    return {
        "main": 100 * mean(all_),
        "metric": "accuracy (exact letter)",
        "count": len(all_),
        "question_types": {k: 100 * mean(v) for k, v in sorted(per.items())},
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
        image = first(rec, "img_path", "image")
        target = {"candidates": list(rec["candidates"]), "correct": rec.get("correct_ans")}
        samples.append(
            Sample(
                first(rec, "id", "question_id", default=row),
                message,
                image_value(image, ctx.image_folder),
                target if target["correct"] is not None else None,
                {"type": rec.get("type"), "concern": rec.get("concern")},
            )
        )
    return samples


def score_qbench(samples, preds, ctx) -> dict:
    pairs = scored(samples, preds)
    if not pairs:
        return no_ground_truth(samples)
    value = mean(metrics.qbench_correct(p, s.target["candidates"], s.target["correct"]) for s, p in pairs)
    return {"main": 100 * value, "metric": "accuracy (rule-based option matching)", "count": len(pairs)}

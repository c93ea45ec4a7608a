"""Cross-check: the same predictions scored by our scorers (`internvl_chat.eval.metrics`) and by lmms-eval's.

    python bench/crosscheck_lmms.py                              # built-in cases -> bench/results/crosscheck_lmms.*
    python bench/crosscheck_lmms.py --predictions textvqa=preds.jsonl --predictions pope=pope.jsonl --out DIR

For each benchmark both harnesses implement (TextVQA, DocVQA / InfoVQA ANLS, ChartQA relaxed accuracy, POPE,
OCRBench, MME) every prediction goes through our scorer and through lmms-eval's own scoring function (imported from
the installed lmms-eval: its tasks' ``process_results`` / aggregation functions and its ``anls`` metric), with the
prediction stripped as both harnesses strip generations. The report gives per benchmark the share of items scored
identically, both aggregate scores, and every answer style on which they differ, with an example.

Built-in cases: for each benchmark, ground truths of the benchmark's shape and the answer styles models produce
(exact, other case, trailing period, a sentence around the answer, number words, thousands separators, percents,
full-width characters, "Yes, there is ..." for yes/no questions...), ``--n`` items per benchmark drawn with a fixed
seed; every style is listed with its counts, so the table says which rule differs, not only by how much.

``--predictions TASK=FILE``: a JSONL file of your own predictions, one item a line: ``{"prediction": ..., "answers":
[...]}`` (textvqa: the 10 human answers; docvqa / infovqa / ocrbench: the accepted answers; chartqa: ``answers`` or
``answer``), ``{"prediction", "label"}`` for pope (``yes`` / ``no``), ``{"prediction", "label", "category",
"image"}`` for mme, plus ``dataset_name`` and ``type`` (category) for ocrbench: the ``text`` field of an
``internvl-chat eval`` ``predictions.jsonl`` joined with the benchmark's annotations.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from internvl_chat.eval import metrics as ours  # noqa: E402

TASKS = ("textvqa", "docvqa", "infovqa", "chartqa", "pope", "ocrbench", "mme")


# ---- lmms-eval's scorers ----------------------------------------------------------------------------------------


def _lmms():
    """lmms-eval's scoring functions (the installed package), by benchmark."""
    import importlib

    from loguru import logger

    # lmms-eval's aggregation functions log every category at INFO.
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from lmms_eval.api.metrics import anls

    mod = {name: importlib.import_module(f"lmms_eval.tasks.{name}.utils") for name in TASKS if name not in ("docvqa",)}
    return anls, mod


# ---- built-in cases ---------------------------------------------------------------------------------------------

WORDS = ["stop", "coca cola", "the beatles", "exit", "red", "2", "three", "1,200", "st. louis", "dr. pepper"]
NUMBER_WORDS = {"2": "two", "3": "three", "10": "ten"}
FULLWIDTH = str.maketrans({chr(c): chr(c + 0xFEE0) for c in range(0x21, 0x7F)})


def _styles(answer: str, rng: random.Random) -> dict[str, str]:
    """Ways a model writes `answer` (short-answer prompts)."""
    out = {
        "exact": answer,
        "upper case": answer.upper(),
        "capitalized": answer.capitalize(),
        "trailing period": answer + ".",
        "sentence": f"The answer is {answer}.",
        "quoted": f'"{answer}"',
        "extra spaces": f"  {answer}  ".replace(" ", "  "),
        "article": f"the {answer}",
        "wrong": rng.choice([w for w in WORDS if w != answer] + ["unknown"]),
        "empty": "",
        "full-width": answer.translate(FULLWIDTH),
        "newline": answer.replace(" ", "\n"),
    }
    if answer in NUMBER_WORDS:
        out["number word"] = NUMBER_WORDS[answer]
    if answer.replace(",", "").isdigit() and "," in answer:
        out["no thousands separator"] = answer.replace(",", "")
    return out


def _pick(rng, styles: dict[str, str]) -> tuple[str, str]:
    name = rng.choice(sorted(styles))
    return name, styles[name]


def cases(task: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{task}-{seed}")
    items = []
    for i in range(n):
        if task == "textvqa":
            main = rng.choice(WORDS)
            others = [rng.choice(WORDS) for _ in range(rng.randint(0, 6))]
            answers = [main] * (10 - len(others)) + others
            rng.shuffle(answers)
            style, pred = _pick(rng, _styles(main, rng))
            items.append({"prediction": pred, "answers": answers, "style": style})
        elif task in ("docvqa", "infovqa", "ocrbench"):
            pool = ["$1,250.00", "October 12, 1998", "Smith & Co.", "52%", "JOHN DOE", "12", "r&d", "ITC Limited"]
            answers = rng.sample(pool, rng.randint(1, 2))
            styles = _styles(answers[0], rng)
            styles["typo"] = answers[0][:-1] + ("x" if answers[0][-1] != "x" else "y")
            style, pred = _pick(rng, styles)
            item = {"prediction": pred, "answers": answers, "style": style}
            if task == "ocrbench":
                item["dataset_name"] = rng.choice(["IIIT5K", "docVQA", "HME100k"])
                item["type"] = rng.choice(ours.OCRBENCH_CATEGORIES)
            items.append(item)
        elif task == "chartqa":
            target = rng.choice(["17", "0.57", "45%", "2019", "Yes", "Brazil", "0", "1200", "23.5"])
            styles = _styles(target, rng)
            if target.replace(".", "").isdigit():
                value = float(target)
                styles["within 5%"] = f"{value * 1.04:g}"
                styles["off by 6%"] = f"{value * 1.06 + 0.01:g}"
            if target.endswith("%"):
                styles["no percent sign"] = target.rstrip("%")
                styles["as fraction"] = f"{float(target.rstrip('%')) / 100:g}"
            style, pred = _pick(rng, styles)
            items.append({"prediction": pred, "answers": [target], "style": style})
        elif task == "pope":
            # Balanced labels as in every POPE split; the answer styles lean to "yes" as models do.
            label = "yes" if i % 2 == 0 else "no"
            styles = {
                "Yes": "Yes",
                "No": "No",
                "yes.": "yes.",
                "No.": "No.",
                "Yes, there is ...": "Yes, there is a car in the image.",
                "No, there is no ...": "No, there is no car in the image.",
                "There is no ...": "There is no car in the image.",
                "not sure": "I am not sure.",
                "sentence with yes": "The image shows a car, yes.",
                "empty": "",
            }
            names = sorted(styles) + ["Yes", "Yes", "Yes, there is ...", "Yes, there is ..."]
            style = rng.choice(names)
            items.append({"prediction": styles[style], "label": label, "style": style})
        elif task == "mme":
            category = rng.choice(ours.MME_PERCEPTION + ours.MME_COGNITION)
            label = rng.choice(["Yes", "No"])
            styles = {
                "Yes": "Yes",
                "No": "No",
                "Yes.": "Yes.",
                "No, ...": "No, it is not.",
                "Y": "Y",
                "N": "N",
                "N.": "N.",
                "Not": "Not",
                "yes inside": "It is yes.",
                "The answer is no": "The answer is no.",
                "empty": "",
            }
            style, pred = _pick(rng, styles)
            # MME asks two questions per image: items come in pairs.
            items.append({"prediction": pred, "label": label, "category": category, "image": f"{i // 2}.png"})
            items[-1]["style"] = style
    if task == "mme":
        # Two questions per image, within one category: the second of a pair takes the first's category.
        for a, b in zip(items[::2], items[1::2]):
            b["category"] = a["category"]
        if len(items) % 2:
            items.pop()
    return items


# ---- scoring ----------------------------------------------------------------------------------------------------


def _strip(items):
    for it in items:
        it["prediction"] = str(it["prediction"]).strip()
    return items


def score(task: str, items: list[dict]) -> dict:
    """Per-item scores and aggregates from both harnesses."""
    anls, mod = _lmms()
    items = _strip([dict(it) for it in items])
    per = []
    agg: dict[str, tuple[float, float]] = {}
    if task == "textvqa":
        for q, it in enumerate(items):
            a = ours.vqa_accuracy(it["prediction"], list(it["answers"]), protocol="m4c")
            doc = {"answers": list(it["answers"]), "question_id": q}
            b = mod["textvqa"].textvqa_process_results(doc, [it["prediction"]])["exact_match"]
            per.append((a, b))
        agg["accuracy"] = _means(per)
    elif task in ("docvqa", "infovqa"):
        for it in items:
            per.append((ours.anls(it["prediction"], it["answers"]), anls(it["answers"], [it["prediction"]])["anls"]))
        agg["anls"] = _means(per)
    elif task == "chartqa":
        for it in items:
            a = ours.chartqa_score(it["prediction"], it["answers"])
            doc = {"answer": it["answers"][0], "type": "human_test"}
            b = mod["chartqa"].chartqa_process_results(doc, [it["prediction"]])["relaxed_overall"]
            per.append((a, b))
        agg["relaxed_accuracy"] = _means(per)
    elif task == "ocrbench":
        for it in items:
            a = ours.ocrbench_match(it["prediction"], it["answers"], it["dataset_name"])
            doc = {"answer": it["answers"], "dataset": it["dataset_name"], "question_type": it["type"]}
            b = mod["ocrbench"].ocrbench_process_results(doc, [it["prediction"]])["ocrbench_accuracy"]["score"]
            per.append((float(a), float(b)))
        total = len(items) or 1
        agg["score_per_1000"] = tuple(1000 * sum(x[i] for x in per) / total for i in (0, 1))
    elif task == "pope":
        preds, labels, lmms_rows = [], [], []
        for q, it in enumerate(items):
            preds.append(it["prediction"])
            labels.append(it["label"])
            row = mod["pope"].pope_process_results({"answer": it["label"], "question_id": q}, [it["prediction"]])[
                "pope_accuracy"
            ]
            lmms_rows.append(row)
            per.append((float(ours.pope_parse(it["prediction"]) == it["label"]), row["score"]))
        m = ours.pope_metrics(preds, labels)
        p = mod["pope"]
        for key, fn in (
            ("accuracy", p.pope_aggregate_accuracy),
            ("precision", p.pope_aggregate_precision),
            ("recall", p.pope_aggregate_recall),
            ("f1", p.pope_aggregate_f1_score),
            ("yes_ratio", p.pope_aggregate_yes_ratio),
        ):
            agg[key] = (m[key], fn(lmms_rows))
    elif task == "mme":
        mine = ours.mme_scores(items)
        rows = defaultdict(list)
        for it in items:
            doc = {
                "answer": it["label"],
                "category": it["category"],
                "question_id": f"{it['category']}/{it['image']}",
            }
            out = mod["mme"].mme_process_results(doc, [it["prediction"]])
            ((key, row),) = out.items()
            rows[key].append(row)
            per.append((float(ours.mme_parse(it["prediction"]) == it["label"].lower()), row["score"]))
        agg["perception"] = (mine["perception"], mod["mme"].mme_aggregate_results(rows["mme_perception_score"]))
        agg["cognition"] = (mine["cognition"], mod["mme"].mme_aggregate_results(rows["mme_cognition_score"]))
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    differ = Counter()
    styles = Counter()
    example = {}
    for it, (a, b) in zip(items, per):
        style = it.get("style", "-")
        styles[style] += 1
        if abs(a - b) > 1e-9:
            differ[style] += 1
            example.setdefault(style, {"prediction": it["prediction"], "truth": _truth(it), "ours": a, "lmms": b})
    same = sum(1 for a, b in per if abs(a - b) <= 1e-9)
    return {
        "items": len(items),
        "item_agreement": same / len(items) if items else None,
        "aggregates": {k: {"ours": v[0], "lmms_eval": v[1]} for k, v in agg.items()},
        "styles": dict(sorted(styles.items())),
        "differ_by_style": dict(sorted(differ.items())),
        "examples": example,
    }


def _means(per):
    n = len(per) or 1
    return (sum(a for a, _ in per) / n, sum(b for _, b in per) / n)


def _truth(it):
    if "answers" in it:
        return it["answers"] if len(it["answers"]) <= 3 else sorted(Counter(it["answers"]).items())
    return it["label"]


# ---- report -----------------------------------------------------------------------------------------------------


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) and not v.is_integer() else f"{v:g}"


def markdown(results: dict, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| benchmark | items | items scored alike | aggregate | ours | lmms-eval |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, r in results.items():
        for j, (name, v) in enumerate(r["aggregates"].items()):
            head = [task, str(r["items"]), f"{100 * r['item_agreement']:.1f}%"] if j == 0 else ["", "", ""]
            lines.append("| " + " | ".join(head + [name, _fmt(v["ours"]), _fmt(v["lmms_eval"])]) + " |")
    lines += ["", "Answer styles scored differently (one example each; score = ours / lmms-eval):", ""]
    lines += [
        "| benchmark | style | items | prediction | truth | ours | lmms-eval |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, r in results.items():
        for style, count in r["differ_by_style"].items():
            ex = r["examples"][style]
            pred = json.dumps(ex["prediction"], ensure_ascii=False).replace("|", "\\|")
            truth = json.dumps(ex["truth"], ensure_ascii=False).replace("|", "\\|")
            lines.append(
                f"| {task} | {style} | {count}/{r['styles'][style]} | {pred} | {truth} | {_fmt(ex['ours'])} | "
                f"{_fmt(ex['lmms'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="built-in items per benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--predictions", action="append", default=[], metavar="TASK=FILE", help="your own items")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for crosscheck_lmms.md/json")
    args = parser.parse_args(argv)
    files = {}
    for pair in args.predictions:
        task, _, path = pair.partition("=")
        if task not in TASKS or not path:
            parser.error(f"--predictions expects TASK=FILE with TASK one of {', '.join(TASKS)}, got {pair!r}")
        files[task] = path
    tasks = list(files) if files else [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = {}
    for task in tasks:
        if task in files:
            items = [json.loads(line) for line in Path(files[task]).read_text().splitlines() if line.strip()]
            for it in items:
                if task == "chartqa" and "answers" not in it:
                    it["answers"] = [it["answer"]]
        else:
            items = cases(task, args.n, args.seed)
        results[task] = score(task, items)
    import lmms_eval

    command = "python bench/crosscheck_lmms.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "lmms_eval": getattr(lmms_eval, "__version__", "?")}
    try:
        from importlib.metadata import version

        meta["lmms_eval"] = version("lmms_eval")
    except Exception:  # noqa: BLE001 (a version string is cosmetic)
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosscheck_lmms.json").write_text(json.dumps({**meta, "results": results}, indent=2, default=str) + "\n")
    text = f"lmms-eval {meta['lmms_eval']}. " + markdown(results, meta["command"])
    (out / "crosscheck_lmms.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

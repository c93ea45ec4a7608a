"""Evaluation report: ``scores.json``, a markdown table and a bar chart, optionally beside the seeds' numbers.

    python -m internvl_chat.eval.report --output out/eval/llava-7b --compare seed --reference llava-v1.5-7b
    # also written by every `internvl-chat eval` run into its --output folder

``scores.json`` = {"model": ..., "reference": ..., "tasks": {task: {"main": value, "metric": ..., ...}}}; each
`internvl-chat eval` run merges its task in. ``report.md`` holds one row per task (our main number, the seed's
published number with ``--compare seed``, the difference), then per task the breakdowns the official scripts print
(GQA binary / open, MME answers neither yes nor no, LLaVA-Bench absolute scores, MM-Vet capability tables, judge
fallbacks, which convention a FUNSD / SROIE score follows); ``scores.png`` is the bar chart (MME on /20 and OCRBench
on /10 so every bar is on a 0-100 scale; labels show the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Published numbers of the seed models (their papers / model cards), keyed by preset name and task reference key.
_LLAVA_KEYS = ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mme", "mmbench", "mmbench_cn", "mmvet")
SEED_SCORES: dict[str, dict[str, float]] = {
    "llava-v1.5-7b": dict(zip(_LLAVA_KEYS, (78.5, 62.0, 50.0, 66.8, 58.2, 85.9, 1510.7, 64.3, 58.3, 30.5))),
    "internvl-chat-vit6b-224to336-vicuna-7b": dict(
        zip(_LLAVA_KEYS, (79.3, 62.9, 52.5, 66.2, 57.0, 86.4, 1525.1, 64.6, 57.6, 31.2))
    ),
    "internvl-chat-vit6b-448-vicuna-13b": dict(
        zip(_LLAVA_KEYS, (82.0, 64.1, 60.1, 71.6, 64.8, 87.2, 1579.0, 68.2, 64.0, 36.7))
    ),
    "llavar2-vicuna-13b": dict(
        zip(
            ("ocrbench", "stvqa", "textvqa", "docvqa", "chartqa", "infovqa", "funsd", "sroie"),
            (680, 59.5, 66.0, 71.3, 76.3, 40.2, 36.7, 61.9),
        )
    ),
}
# Bars are drawn on a 0-100 scale: scores with another maximum are divided.
SCALE = {"mme": 20.0, "ocrbench": 10.0}


def reference_name(model_dir: str | None) -> str | None:
    """The preset a model folder was built from (``parameter_counts.json`` of `internvl-chat create`), if any."""
    if not model_dir:
        return None
    counts = Path(model_dir) / "parameter_counts.json"
    if counts.exists():
        return json.loads(counts.read_text()).get("preset")
    return None


def update_scores(output: str | os.PathLike, task: str, result: dict, model: str | None = None, **extra) -> dict:
    """Merges one task's result into ``<output>/scores.json`` and returns the whole document."""
    path = Path(output) / "scores.json"
    doc = json.loads(path.read_text()) if path.exists() else {"model": model, "tasks": {}}
    if model:
        doc["model"] = model
    doc.update({k: v for k, v in extra.items() if v is not None})
    doc.setdefault("tasks", {})[task] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return doc


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown_table(doc: dict, compare: str | None = None, reference: str | None = None) -> str:
    """One row per task: metric, ours, and with ``compare="seed"`` the published number and the difference."""
    from .tasks import TASKS

    seed = SEED_SCORES.get(reference or "", {}) if compare == "seed" else None
    head = "| task | metric | ours |" + (
        f" seed ({reference or 'not a preset: pass --reference NAME'}) | Δ |" if seed is not None else ""
    )
    sep = "| --- | --- | ---: |" + (" ---: | ---: |" if seed is not None else "")
    lines = [head, sep]
    for task, result in sorted(doc.get("tasks", {}).items()):
        ours = result.get("main")
        row = f"| {task} | {result.get('metric') or ''} | {_fmt(ours)} |"
        if seed is not None:
            key = TASKS[task].reference_key if task in TASKS else None
            theirs = seed.get(key) if key else None
            delta = ours - theirs if ours is not None and theirs is not None else None
            row += f" {_fmt(theirs)} | {_fmt(delta) if delta is None else f'{delta:+.1f}'} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _table(rows: dict, head: str) -> list[str]:
    return [f"| {head} | score |", "| --- | ---: |", *(f"| {k} | {_fmt(v)} |" for k, v in rows.items())]


def task_details(task: str, result: dict) -> list[str]:
    """Markdown lines of one task's breakdowns (empty when it has none)."""
    lines = []
    if result.get("judge_model"):
        lines.append(f"- judge: `{result['judge_model']}`")
    if "binary" in result or "open" in result:
        lines.append(f"- binary: {_fmt(result.get('binary'))}, open: {_fmt(result.get('open'))} (GQA eval.py)")
    if "other_answers" in result:
        per = ", ".join(f"{k} {v['other_answers']}" for k, v in sorted(result.get("subtasks", {}).items()))
        lines.append(f"- answers neither yes nor no: {result['other_answers']} ({per})")
    if "conventions" in result:
        lines.append(f"- containment accuracy: {_fmt(result['contains'])} ({result['conventions']['contains']})")
        fs = result["fscore"]
        lines.append(
            f"- key-value micro-F1: {_fmt(fs['f1'])} (precision {_fmt(fs['precision'])}, recall "
            f"{_fmt(fs['recall'])}; {result['conventions']['fscore']})"
        )
    if "absolute" in result:
        lines += ["", "| category | relative | reference (/100) | model (/100) |", "| --- | ---: | ---: | ---: |"]
        for k, v in result["absolute"].items():
            rel = result["categories"].get(k)
            lines.append(f"| {k} | {_fmt(rel)} | {_fmt(v['reference'])} | {_fmt(v['model'])} |")
        lines += ["", f"- reviews without two scores (counted [-1, -1]): {result.get('judge_unparsed', 0)}"]
    if "capability_integration" in result:
        for key, head in (("capabilities", "capability"), ("capability_integration", "capability integration")):
            table = result[key]
            order = result.get(key.replace("capabilities", "capability") + "_order") or list(table)
            lines += ["", *_table({k: table[k] for k in order if k in table}, head)]
        lines.append("")
        lines.append(
            f"- items scored 0.0 after five re-asks without a readable score: {result.get('judge_fallbacks', 0)}"
            + (f" ({', '.join(result['judge_fallback_items'])})" if result.get("judge_fallback_items") else "")
        )
    return [f"### {task}", "", *lines, ""] if lines else []


def bar_chart(doc: dict, path: str | os.PathLike, compare: str | None = None, reference: str | None = None) -> str:
    """Horizontal bars of the main scores (and the seed's, side by side, with ``compare="seed"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tasks import TASKS

    seed = SEED_SCORES.get(reference or "", {}) if compare == "seed" else {}
    tasks = sorted(t for t, r in doc.get("tasks", {}).items() if r.get("main") is not None)
    fig, ax = plt.subplots(figsize=(8, 0.5 * max(len(tasks), 1) + 1.2))
    ys = list(range(len(tasks)))
    ours = [doc["tasks"][t]["main"] for t in tasks]
    scaled = [v / SCALE.get((TASKS[t].reference_key if t in TASKS else None) or t, 1.0) for t, v in zip(tasks, ours)]
    height = 0.4 if seed else 0.8
    bars = ax.barh([y + (height / 2 if seed else 0) for y in ys], scaled, height=height, label="ours")
    for bar, value in zip(bars, ours):
        ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2, _fmt(value), va="center", fontsize=8)
    if seed:
        theirs = [seed.get(TASKS[t].reference_key) if t in TASKS else None for t in tasks]
        vals = [(v or 0) / SCALE.get(TASKS[t].reference_key or "", 1.0) for t, v in zip(tasks, theirs)]
        ax.barh([y - height / 2 for y in ys], vals, height=height, label=f"seed ({reference})", alpha=0.6)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys, tasks)
    ax.set_xlim(0, 110)
    ax.set_xlabel("score (MME /20, OCRBench /10)")
    ax.set_title(f"{doc.get('model') or 'model'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_report(output: str | os.PathLike, compare: str | None = None, reference: str | None = None) -> dict:
    """(Re)writes ``report.md`` and ``scores.png`` from ``<output>/scores.json``; returns the paths."""
    output = Path(output)
    doc = json.loads((output / "scores.json").read_text())
    reference = reference or doc.get("reference")
    table = markdown_table(doc, compare, reference)
    details = [line for task, result in sorted(doc.get("tasks", {}).items()) for line in task_details(task, result)]
    # A re-scored folder may not record the model: name the output folder rather than a bare "model".
    text = f"# Evaluation of {doc.get('model') or output.resolve().name}\n\n{table}"
    if details:
        text += "\n## Details\n\n" + "\n".join(details)
    (output / "report.md").write_text(text)
    png = bar_chart(doc, output / "scores.png", compare, reference)
    return {"markdown": str(output / "report.md"), "chart": png, "table": table}


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m internvl_chat.eval.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", required=True, help="the eval output folder holding scores.json")
    parser.add_argument("--compare", choices=["seed"], help="put the seeds' published numbers beside ours")
    parser.add_argument("--reference", choices=sorted(SEED_SCORES), help="which seed model to compare with")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_report(args.output, args.compare, args.reference)
    print(out["table"], end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`internvl-chat select`: score instruction data with a model and keep the hardest-to-follow samples.

    internvl-chat select llava_instruct.json --image-folder /data --model DIR --metric mifd --keep 0.1 \
        --output selected.json
    internvl-chat select data.parquet --model DIR --metric ifd --threshold 0.9 --output selected.parquet
    internvl-chat select duo.json --image-folder /data --model DIR --metric ffd --keep 0.3 --output ffd.json
    accelerate launch --num_processes 8 -m internvl_chat.data.select DATA --model DIR --metric mifd ...  # multi-GPU
    internvl-chat select DATA --scores selected.scores.jsonl --metric vfd --keep 0.2 --output other.json  # no model:
                                                                   # re-select (or apply a corrected formula) only

Steps (Cherry-LLM's ``data_by_IFD.py``; LLaVAR-2 published its scoring code but no selection rule):

1. Read DATA (LLaVA JSON/JSONL, an InternVL meta file, a ``datasets`` folder or parquet); malformed records are
   dropped with their reason.
2. Score every QA pair (every 4-turn duo for FFD) with :class:`~internvl_chat.data.scoring.ConditionalLossScorer`
   for the losses the metric needs: the vision model (``--model``) and, for IFD / mIFD, a text model
   (``--text-model``, default: the vision model's language model without images). Resumable: ``--scores FILE``
   (default ``OUTPUT.scores.jsonl``); a rerun skips the samples scored with the same models.
3. Compute the metric per pair / duo (:data:`~internvl_chat.data.scoring.METRICS`, the one place the formulas
   live); drop the units without one (corrupt / missing image, over-long, incomplete duo...) and those above
   ``--max-ratio`` (1: the context makes the text *harder* to predict; Cherry-LLM drops them).
4. Rank (``--select pairs``: the pairs / duos; ``samples``: each sample by the mean of its units) and keep
   ``--keep`` (a fraction <= 1 of the remaining items, Cherry's ``sample_rate``, or a count > 1) from the
   ``--order`` end, or ``--threshold T`` (value >= T). Equal values at the cut: the later item wins (Cherry).
5. Write the kept samples in the input format and file order (LLaVA records and parquet / datasets rows verbatim
   except a conversation that lost pairs; a meta file's samples as LLaVA JSON with resolved image paths),
   ``OUTPUT.hist.png`` (the metric's histogram with the cut) and ``OUTPUT.summary.json`` (the definition, the
   models and the rule that produced the selection; kept, dropped, dropped by reason).

Only IFD's rule is published; threshold, keep fraction and ranking end for VFD / mIFD / FFD are unverified
options (docs/data-selection.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
from collections import Counter
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from .formats import (
    DataError,
    detect_format,
    llava_record_to_sample,
    read_llava_records,
    read_samples,
    write_llava,
)

logger = logging.getLogger(__name__)

__all__ = ["load_selectable", "main", "make_parser", "select_indices", "write_selected"]

RATIO_REASON = "ratio_gt_max"
ORDERS = ("highest", "lowest")
UNVERIFIED = (
    "LLaVAR-2 published no selection rule (threshold, keep fraction, which end of the ranking) for VFD / mIFD / "
    "FFD; the default is Cherry-LLM's rule for IFD (drop > 1, keep the highest) -- unverified for these metrics"
)
# The keys of scoring.METRICS, spelt out so `--help` answers without importing torch (a test keeps them equal).
METRIC_NAMES = ("ffd", "ifd", "mifd", "vfd")


# ------------------------------------------------------------------------------------------------ selection
def select_indices(
    values: Mapping[Hashable, float | None],
    keep: float | None = None,
    threshold: float | None = None,
    max_ratio: float | None = 1.0,
    reasons: Mapping[Hashable, str] | None = None,
    order: str = "highest",
) -> tuple[list, dict]:
    """Cherry-LLM's rule (``data_by_IFD.py``) → (kept items in ascending order, ``{dropped item: reason}``).

    ``values``: metric per item (a sample index, or ``(sample index, qa_id)``; ``None`` when it has none, its
    reason from ``reasons``, default ``"no_score"``). Values above ``max_ratio`` are dropped (``ratio_gt_max``);
    ``threshold`` keeps values ``>= threshold`` (``below_threshold``); ``keep`` ranks the n remaining items by
    ``(value, item)`` ascending and keeps the last ``int(n * keep)`` (``keep <= 1``, Cherry's ``sample_rate``) or
    the last ``int(keep)`` (``keep > 1``, Cherry's ``sample_number``) -- so among equal values at the cut the
    later item wins, and a fraction that rounds to 0 keeps every item, as Cherry's ``list[-0:]`` does.
    ``order="lowest"`` keeps the first ones of the same ranking instead (``not_in_top``).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    dropped: dict = {}
    valid: list[tuple[float, Any]] = []
    for item, value in values.items():
        if value is None:
            dropped[item] = (reasons or {}).get(item, "no_score")
        elif max_ratio is not None and value > max_ratio:
            dropped[item] = RATIO_REASON
        else:
            valid.append((value, item))
    if threshold is not None:
        for value, item in valid:
            if value < threshold:
                dropped[item] = "below_threshold"
        valid = [(v, i) for v, i in valid if v >= threshold]
    if keep is not None:
        if keep <= 0:
            raise ValueError(f"--keep must be > 0, got {keep}")
        n = int(len(valid) * keep) if keep <= 1 else int(keep)
        ranked = sorted(valid)
        if n == 0:
            kept = ranked  # Cherry's ranked[-0:] is the whole list
        else:
            kept = ranked[-n:] if order == "highest" else ranked[:n]
        chosen = {item for _, item in kept}
        for _, item in ranked:
            if item not in chosen:
                dropped[item] = "not_in_top"
        valid = kept
    return sorted(i for _, i in valid), dropped


def pool_by_sample(
    unit_values: Mapping[tuple[int, int], float | None], unit_reasons: Mapping[tuple[int, int], str]
) -> tuple[dict[int, float | None], dict[int, str]]:
    """Unit values → one value per sample (``--select samples``): the mean of its units that have a value."""
    per_sample: dict[int, list[float]] = {}
    reasons: dict[int, str] = {}
    for (index, _), value in unit_values.items():
        per_sample.setdefault(index, [])
        if value is not None:
            per_sample[index].append(value)
        elif (index, _) in unit_reasons:
            reasons.setdefault(index, unit_reasons[(index, _)])
    values = {i: (statistics.fmean(v) if v else None) for i, v in per_sample.items()}
    return values, {i: r for i, r in reasons.items() if values[i] is None}


def _moved_images(n: int, content: Any, at_end: bool) -> Any:
    """``content`` with ``n`` image placeholders added in front (LLaVA's place) or at its end."""
    if n == 0:
        return content
    if isinstance(content, str) or content is None:
        text = content or ""
        return (text + "\n" + "<image>" * n) if at_end else ("<image>\n" * n + text)
    blocks = [{"type": "image"} for _ in range(n)]
    return [*content, *blocks] if at_end else [*blocks, *content]


def _images_in(content: Any) -> int:
    if isinstance(content, str) or content is None:
        return (content or "").count("<image>")
    return sum(1 if b.get("type") == "image" else (b.get("text") or "").count("<image>") for b in content)


def keep_turns(turns: list[dict], kept: set[int], role_key: str, content_key: str, system: str) -> list[dict]:
    """The conversation ``turns`` with only the non-system turns at positions ``kept`` (and the system turns).

    Image placeholders of dropped turns move to the next kept user turn (or the end of the last one), so every
    image of the sample stays referenced and in order. Turns are dicts with ``role_key`` / ``content_key``
    (``from`` / ``value`` for LLaVA records, ``role`` / ``content`` for message lists).
    """
    out: list[dict] = []
    pending = 0
    last_user = None
    position = 0
    for turn in turns:
        if turn.get(role_key) == system:
            out.append(turn)
            continue
        if position in kept:
            turn = dict(turn)
            if pending and turn.get(role_key) in ("human", "user"):
                turn[content_key] = _moved_images(pending, turn.get(content_key), at_end=False)
                pending = 0
            if turn.get(role_key) in ("human", "user"):
                last_user = len(out)
            out.append(turn)
        else:
            n = _images_in(turn.get(content_key))
            pending += n
        position += 1
    if pending and last_user is not None:
        turn = out[last_user]
        turn[content_key] = _moved_images(pending, turn.get(content_key), at_end=True)
    return out


# ---------------------------------------------------------------------------------------------- input / output
class Selectable:
    """The samples of DATA plus what is needed to write a subset back in the same format."""

    def __init__(self, fmt: str, samples: list, raw: Any, raw_index: list[int], read_errors: Counter):
        self.fmt = fmt
        self.samples = samples  # normalised samples (a list, or HFSamples)
        self.raw = raw  # LLaVA: the raw records; datasets / parquet: the Dataset; meta: None
        self.raw_index = raw_index  # sample i ↔ raw record raw_index[i]
        self.read_errors = read_errors  # reason → count of malformed records


def load_selectable(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Selectable:
    """Reads DATA with the data layer's readers, keeping the raw records so the output is written verbatim."""
    fmt = detect_format(path)
    errors: Counter = Counter()
    source = os.fspath(path)
    if fmt == "llava":
        records = read_llava_records(path)
        samples, index = [], []
        for i, record in enumerate(records):
            try:
                samples.append(llava_record_to_sample(record, source, i, image_folder))
                index.append(i)
            except DataError as err:
                errors[err.kind] += 1
                logger.warning("dropping %s", err)
        return Selectable(fmt, samples, records, index, errors)
    if fmt == "meta":
        stats: Counter = Counter()
        samples = read_samples(path, on_error="skip", stats=stats)
        for key, n in stats.items():
            if key.startswith("skipped_"):
                errors[key[len("skipped_") :]] += n
        return Selectable(fmt, list(samples), None, list(range(len(samples))), errors)
    stats = Counter()
    samples = read_samples(path, image_folder=image_folder, on_error="skip", stats=stats, fmt=fmt)
    for key, n in stats.items():
        if key.startswith("skipped_"):
            errors[key[len("skipped_") :]] += n
    # HFSamples keeps the row numbers of the valid rows and the Dataset (images undecoded: written back as is).
    return Selectable(fmt, samples, samples.ds, list(samples.indices), errors)


def write_selected(data: Selectable, kept: Mapping[int, set[int] | None], output: str | os.PathLike) -> int:
    """Writes the kept samples in the input format; returns how many.

    ``kept``: sample index → ``None`` (the whole sample, verbatim) or the positions of the non-system turns to keep
    (the conversation is rewritten with :func:`keep_turns`; every other field stays as it was).
    """
    output = os.fspath(output)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    order = sorted(kept)
    if data.fmt == "llava":
        records = []
        for i in order:
            record = data.raw[data.raw_index[i]]
            if kept[i] is not None:
                record = {
                    **record,
                    "conversations": keep_turns(record["conversations"], kept[i], "from", "value", "system"),
                }
            records.append(record)
        with open(output, "w", encoding="utf-8") as f:
            if output.endswith(".jsonl"):
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            else:
                json.dump(records, f, ensure_ascii=False, indent=1)
        return len(records)
    if data.fmt == "meta":
        # A meta file mixes sources with their own roots: the subset is one LLaVA file with resolved image paths.
        samples = []
        for i in order:
            sample = data.samples[i]
            if kept[i] is not None:
                sample = {**sample, "messages": keep_turns(sample["messages"], kept[i], "role", "content", "system")}
            samples.append(sample)
        return write_llava(samples, output)
    rows = [data.raw_index[i] for i in order]
    subset = data.raw.select(rows)
    turns = {row: kept[i] for row, i in zip(range(len(rows)), order) if kept[i] is not None}
    if turns:

        def rewrite(record: dict, row: int) -> dict:
            if row in turns:
                record["messages"] = keep_turns(record["messages"], turns[row], "role", "content", "system")
            return record

        subset = subset.map(rewrite, with_indices=True)
    if output.endswith(".parquet"):
        subset.to_parquet(output)
    else:
        subset.save_to_disk(output)
    return len(subset)


def _sidecar(output: str, suffix: str) -> str:
    path = Path(output)
    base = path.with_suffix("") if path.suffix in (".json", ".jsonl", ".parquet") else path
    return str(base) + suffix


def write_histogram(
    values: list[float], path: str, metric: str, cut: float | None, max_ratio: float | None, order: str = "highest"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if values:
        ax.hist(values, bins=min(60, max(10, len(values) // 5)), color="tab:blue", alpha=0.8)
    if max_ratio is not None:
        ax.axvline(max_ratio, color="tab:red", linestyle="--", label=f"drop > {max_ratio:g}")
    if cut is not None:
        ax.axvline(cut, color="tab:green", label=f"kept {'>=' if order == 'highest' else '<='} {cut:.4g}")
    from .scoring import METRICS

    ax.set_xlabel(METRICS[metric].expression)
    ax.set_ylabel("items")
    ax.set_title(f"{metric} over {len(values)} scored items")
    if max_ratio is not None or cut is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI
def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat select", description=__doc__.splitlines()[0])
    parser.add_argument("data", help="LLaVA JSON/JSONL, InternVL meta JSON, datasets folder or parquet")
    parser.add_argument("--model", help="scoring (vision) model folder (optional with --scores holding every sample)")
    parser.add_argument(
        "--metric",
        required=True,
        choices=METRIC_NAMES,
        help="ifd: s(A|Q)/s(A) (text model); vfd: s(Q,A|I)/s(Q,A); mifd: VFD x IFD (vision x text model); ffd: "
        "s(Q2,A2|I,Q1,A1)/s(Q2,A2|I) per 4-turn duo. Formulas: data/scoring.py METRICS, docs/data-selection.md",
    )
    parser.add_argument(
        "--text-model",
        help="text-only causal LM folder for IFD (mifd, ifd); default: the --model's own language model run without "
        "images (LLaVAR-2 used Phi-3-mini-4k-instruct)",
    )
    parser.add_argument("--text-template", help="the text model's template (default: its tokenizer's chat template)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--keep",
        type=float,
        help="Cherry-LLM's rule: items without a score or with metric > --max-ratio are dropped first; of the n "
        "left, int(n * KEEP) (KEEP <= 1; 0 after rounding keeps all n) or KEEP (KEEP > 1) are kept from the "
        "--order end; equal values at the cut: the later item wins. E.g. 7 items of which 2 have metric <= 1: "
        "--keep 0.5 keeps int(2 * 0.5) = 1. Unverified for vfd/mifd/ffd",
    )
    how.add_argument("--threshold", type=float, help="keep items whose metric is >= this value (unverified)")
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=1.0,
        help="drop values above this first (Cherry-LLM: 1; 'inf' keeps all). Unverified for vfd/mifd/ffd",
    )
    parser.add_argument(
        "--order",
        choices=ORDERS,
        default="highest",
        help="which end of the ranking --keep keeps (Cherry-LLM: highest). Unverified for vfd/mifd/ffd",
    )
    parser.add_argument(
        "--select",
        choices=("pairs", "samples"),
        default="pairs",
        help="pairs: rank QA pairs (duos for ffd) and keep the selected ones, rewriting conversations; samples: "
        "rank samples by the mean of their pairs' values and keep whole samples",
    )
    parser.add_argument("--output", required=True, help="selected subset, written in the input format")
    parser.add_argument("--image-folder", help="folder that relative image paths are joined to")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--scores", help="scores JSONL (resumable; default OUTPUT.scores.jsonl)")
    parser.add_argument("--histogram", help="histogram PNG (default OUTPUT.hist.png)")
    parser.add_argument("--summary", help="summary JSON (default OUTPUT.summary.json)")
    parser.add_argument("--template", help="conversation template (default: the model's chat template)")
    parser.add_argument("--max-length", type=int, help="longest sequence (default: tokenizer.model_max_length)")
    parser.add_argument("--padding-side", default="right", choices=["right", "left"])
    parser.add_argument(
        "--terminator",
        choices=("auto", "exclude", "include"),
        default="auto",
        help="score the answer's turn terminator (</s>, <|end|>...)? auto: as the published code (IFD no, "
        "VFD / FFD yes)",
    )
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32...")
    parser.add_argument("--attn-implementation", help="sdpa, eager, flash_attention_2")
    return parser


def _value_stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "max": max(values),
    }


def _load_text_model(args: argparse.Namespace, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..loading import resolve_dtype

    tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    kwargs = {"dtype": resolve_dtype(args.dtype, device)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(args.text_model, **kwargs).to(device).eval()
    return model, tokenizer


def _models_of(records: Mapping[str, Mapping[str, Any]], losses: tuple[str, ...]) -> dict[str, list[str]]:
    """Which model computed each loss, as the scores records say (runs from a scores file without a model)."""
    from .scoring import LOSSES

    found: dict[str, set[str]] = {}
    for record in records.values():
        for name, config in (record.get("config") or {}).items():
            if name in losses:
                found.setdefault(LOSSES[name].model, set()).add(config.get("model"))
    return {role: sorted(str(m) for m in names) for role, names in found.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .scoring import LOSSES, METRICS, ConditionalLossScorer, compute_metric, read_scores, sample_keys

    spec = METRICS[args.metric]
    if args.keep is None and args.threshold is None:
        raise SystemExit("pass --keep FRACTION|COUNT or --threshold T")
    if args.text_model and not args.model:
        raise SystemExit("--text-model needs --model (the vision model)")
    scores_path = args.scores or _sidecar(args.output, ".scores.jsonl")
    data = load_selectable(args.data, args.image_folder)
    keys = sample_keys(data.samples)
    logger.info("%s: %d samples (%d malformed dropped)", args.data, len(keys), sum(data.read_errors.values()))

    scorer_stats: dict[str, int] = {}
    is_main = True
    if args.model:
        from accelerate import Accelerator

        from ..loading import load_model

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        is_main = accelerator.is_main_process
        device = str(accelerator.device)
        model, processor = load_model(
            args.model, dtype=args.dtype, device=device, attn_implementation=args.attn_implementation
        )
        text_model = text_tokenizer = None
        if args.text_model and any(LOSSES[name].model == "text" for name in spec.losses):
            text_model, text_tokenizer = _load_text_model(args, device)
        scorer = ConditionalLossScorer(
            model,
            processor,
            template=args.template,
            text_model=text_model,
            text_tokenizer=text_tokenizer,
            text_template=args.text_template,
            model_name=os.fspath(args.model),
            text_model_name=os.fspath(args.text_model) if text_model is not None else None,
            batch_size=args.batch_size,
            max_length=args.max_length,
            padding_side=args.padding_side,
            terminator=args.terminator,
            accelerator=accelerator,
        )
        records = scorer.score(data.samples, args.metric, scores_path=scores_path)
        scorer_stats = dict(scorer.stats)
    else:
        if not os.path.exists(scores_path):
            raise SystemExit(f"no --model and no scores file {scores_path!r}: nothing to select from")
        records = read_scores(scores_path)
    if not is_main:
        return {}

    # One value per unit (QA pair, or duo for ffd), keyed (sample index, qa_id).
    unit_values: dict[tuple[int, int], float | None] = {}
    unit_reasons: dict[tuple[int, int], str] = {}
    sample_reasons: dict[int, str] = {}
    for i, key in enumerate(keys):
        record = records.get(key)
        if record is None or record.get("status") != "ok":
            sample_reasons[i] = record.get("reason", "error") if record else "not_scored"
            continue
        units = [u for u in record.get("units", []) if u.get("unit") == spec.unit]
        if not units:
            sample_reasons[i] = "missing_loss"
        for unit in units:
            value, reason = compute_metric(unit, args.metric)
            unit_values[(i, unit["qa_id"])] = value
            if reason:
                unit_reasons[(i, unit["qa_id"])] = reason
    max_ratio = None if args.max_ratio is not None and math.isinf(args.max_ratio) else args.max_ratio
    if args.select == "samples":
        values, reasons = pool_by_sample(unit_values, unit_reasons)
        for i, reason in sample_reasons.items():
            values[i], reasons[i] = None, reason
        kept_items, dropped = select_indices(values, args.keep, args.threshold, max_ratio, reasons, args.order)
        kept: dict[int, set[int] | None] = {i: None for i in kept_items}
        dropped_samples = len(dropped)
    else:
        values = dict(unit_values)
        reasons = dict(unit_reasons)
        for i, reason in sample_reasons.items():
            values[(i, -1)], reasons[(i, -1)] = None, reason
        kept_items, dropped = select_indices(values, args.keep, args.threshold, max_ratio, reasons, args.order)
        width = 2 if spec.unit == "pair" else 4
        chosen: dict[int, set[int]] = {}
        for i, qa_id in kept_items:
            chosen.setdefault(i, set()).update(range(qa_id, qa_id + width))
        kept = {}
        for i, turns in chosen.items():
            n_turns = sum(1 for m in data.samples[i]["messages"] if m.get("role") != "system")
            kept[i] = None if turns >= set(range(n_turns)) else turns
        dropped_samples = len(keys) - len(kept)
    written = write_selected(data, kept, args.output)

    scored = [v for v in values.values() if v is not None]
    kept_values = [values[item] for item in kept_items]
    cut = min(kept_values, default=None) if args.order == "highest" else max(kept_values, default=None)
    histogram = args.histogram or _sidecar(args.output, ".hist.png")
    write_histogram(scored, histogram, args.metric, cut, max_ratio, args.order)
    by_reason = Counter(dropped.values())
    for kind, n in data.read_errors.items():
        by_reason[f"malformed_{kind}"] += n
    models = (
        {role: [name] for role, name in scorer.model_names.items() if role in {LOSSES[n].model for n in spec.losses}}
        if args.model
        else _models_of(records, spec.losses)
    )
    unit_name = "pairs" if spec.unit == "pair" else "duos"
    summary = {
        "data": os.fspath(args.data),
        "metric": args.metric,
        "expression": spec.expression,
        "definition": {
            "metric": args.metric,
            "expression": spec.expression,
            "unit": spec.unit,
            "losses": {name: LOSSES[name].description for name in spec.losses},
            "formula_source": spec.source,
            "formula_follows_published_code": spec.formula_verified,
            "terminator": args.terminator if args.model else "as stored in the scores file",
        },
        "models": models,
        "rule": {
            "select": args.select,
            "order": args.order,
            "max_ratio": max_ratio,
            "keep": args.keep,
            "threshold": args.threshold,
            "ties": "equal values at the cut: the later item (file order, then qa_id) is kept",
            "published": spec.rule_verified and args.order == "highest" and max_ratio == 1.0,
            "note": "Cherry-LLM's published rule" if spec.rule_verified else UNVERIFIED,
        },
        "total": len(keys) + sum(data.read_errors.values()),
        "scored": len(scored),
        f"scored_{unit_name}": sum(1 for v in unit_values.values() if v is not None),
        "kept": written,
        f"kept_{unit_name}": sum(len(_units_in(kept[i], data.samples[i], spec.unit)) for i in kept),
        "dropped": dropped_samples + sum(data.read_errors.values()),
        "dropped_by_reason": dict(sorted(by_reason.items())),
        "cut_value": cut,
        "values": _value_stats(scored),
        "scorer": scorer_stats,
        "output": os.fspath(args.output),
        "scores": scores_path,
        "histogram": histogram,
    }
    summary_path = args.summary or _sidecar(args.output, ".summary.json")
    summary["summary"] = summary_path
    Path(summary_path).write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _units_in(turns: set[int] | None, sample: Mapping[str, Any], unit: str) -> list[int]:
    n_turns = sum(1 for m in sample["messages"] if m.get("role") != "system")
    width = 2 if unit == "pair" else 4
    starts = range(0, n_turns - width + 1, width)
    return [q for q in starts if turns is None or q in turns]


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(args)
    if summary:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

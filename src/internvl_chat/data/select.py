"""`internvl-chat select`: score instruction data with a model and keep the hardest-to-follow samples.

    internvl-chat select llava_instruct.json --image-folder /data --model DIR --metric mifd --keep 0.1 \
        --output selected.json
    internvl-chat select data.parquet --model DIR --metric ifd --threshold 0.9 --output selected.parquet
    internvl-chat select duo.json --image-folder /data --model DIR --metric ffd --keep 0.3 --output ffd.json
    accelerate launch --num_processes 8 -m internvl_chat.data.select DATA --model DIR --metric mifd ...  # multi-GPU
    internvl-chat select DATA --scores selected.scores.jsonl --metric vfd --keep 0.2 --output other.json  # no model:
                                                                   # re-select (or apply a corrected formula) only

Steps (Cherry-LLM's ``data_by_IFD.py``, applied by LLaVAR-2 to mIFD / FFD):

1. Read DATA (LLaVA JSON/JSONL, an InternVL meta file, a ``datasets`` folder or parquet); malformed records are
   dropped with their reason.
2. Score every sample with :class:`~internvl_chat.data.scoring.ConditionalLossScorer` for the contexts the metric
   needs (resumable: ``--scores FILE``, default ``OUTPUT.scores.jsonl``; a rerun skips the scored ids).
3. Compute the metric (:data:`~internvl_chat.data.scoring.METRICS`, the one place the formulas live) and drop the
   samples without one (corrupt / missing image, over-long, not a duo-conversation...) and those with a ratio above
   ``--max-ratio`` (1: the context makes the answer *harder* to predict; Cherry-LLM drops them).
4. Keep ``--keep`` (a fraction <= 1 of the remaining samples, as Cherry's ``sample_rate``; or a count > 1) with the
   highest values, or ``--threshold T`` (value >= T). Ties are broken by file order.
5. Write the kept samples in the input format and file order (LLaVA records verbatim, parquet / datasets rows
   verbatim; a meta file's samples as LLaVA JSON with resolved image paths), ``OUTPUT.hist.png`` (the metric's
   histogram with the cut) and ``OUTPUT.summary.json`` (kept, dropped, dropped by reason, the formula used).
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
from collections.abc import Mapping
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
# The keys of scoring.METRICS, spelt out so `--help` answers without importing torch (a test keeps them equal).
METRIC_NAMES = ("ffd", "ifd", "mifd", "vfd")


# ------------------------------------------------------------------------------------------------ selection
def select_indices(
    values: Mapping[int, float | None],
    keep: float | None = None,
    threshold: float | None = None,
    max_ratio: float | None = 1.0,
    reasons: Mapping[int, str] | None = None,
) -> tuple[list[int], dict[int, str]]:
    """Cherry-LLM's rule → (kept indices in ascending order, ``{dropped index: reason}``).

    ``values``: metric per sample index (``None`` when it has none; its reason from ``reasons``, default
    ``"no_score"``). Values above ``max_ratio`` are dropped (``ratio_gt_max``); then ``threshold`` keeps values
    ``>= threshold`` (``below_threshold``) and/or ``keep`` keeps the top ``int(n * keep)`` of the n remaining
    (``keep <= 1``, Cherry's ``sample_rate``; 1 keeps all) or the top ``int(keep)`` (``keep > 1``, Cherry's
    ``sample_number``)
    by descending value, ties in index order (``not_in_top``).
    """
    dropped: dict[int, str] = {}
    valid: list[tuple[int, float]] = []
    for index, value in values.items():
        if value is None:
            dropped[index] = (reasons or {}).get(index, "no_score")
        elif max_ratio is not None and value > max_ratio:
            dropped[index] = RATIO_REASON
        else:
            valid.append((index, value))
    if threshold is not None:
        for index, value in valid:
            if value < threshold:
                dropped[index] = "below_threshold"
        valid = [(i, v) for i, v in valid if v >= threshold]
    if keep is not None:
        if keep <= 0:
            raise ValueError(f"--keep must be > 0, got {keep}")
        n = int(len(valid) * keep) if keep <= 1 else int(keep)
        ranked = sorted(valid, key=lambda iv: (-iv[1], iv[0]))
        for index, _ in ranked[n:]:
            dropped[index] = "not_in_top"
        valid = ranked[:n]
    return sorted(i for i, _ in valid), dropped


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


def write_selected(data: Selectable, kept: list[int], output: str | os.PathLike) -> int:
    """Writes the kept samples (indices into ``data.samples``) in the input format; returns how many."""
    output = os.fspath(output)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    if data.fmt == "llava":
        records = [data.raw[data.raw_index[i]] for i in kept]
        with open(output, "w", encoding="utf-8") as f:
            if output.endswith(".jsonl"):
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            else:
                json.dump(records, f, ensure_ascii=False, indent=1)
        return len(records)
    if data.fmt == "meta":
        # A meta file mixes sources with their own roots: the subset is one LLaVA file with resolved image paths.
        return write_llava([data.samples[i] for i in kept], output)
    subset = data.raw.select([data.raw_index[i] for i in kept])
    if output.endswith(".parquet"):
        subset.to_parquet(output)
    else:
        subset.save_to_disk(output)
    return len(subset)


def _sidecar(output: str, suffix: str) -> str:
    path = Path(output)
    base = path.with_suffix("") if path.suffix in (".json", ".jsonl", ".parquet") else path
    return str(base) + suffix


def write_histogram(values: list[float], path: str, metric: str, cut: float | None, max_ratio: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if values:
        ax.hist(values, bins=min(60, max(10, len(values) // 5)), color="tab:blue", alpha=0.8)
    if max_ratio is not None:
        ax.axvline(max_ratio, color="tab:red", linestyle="--", label=f"drop > {max_ratio:g}")
    if cut is not None:
        ax.axvline(cut, color="tab:green", label=f"kept >= {cut:.4g}")
    from .scoring import METRICS

    ax.set_xlabel(METRICS[metric].expression)
    ax.set_ylabel("samples")
    ax.set_title(f"{metric} over {len(values)} scored samples")
    if max_ratio is not None or cut is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI
def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat select", description=__doc__.splitlines()[0])
    parser.add_argument("data", help="LLaVA JSON/JSONL, InternVL meta JSON, datasets folder or parquet")
    parser.add_argument("--model", help="scoring model folder (optional with --scores holding every sample)")
    parser.add_argument("--metric", required=True, choices=METRIC_NAMES, help="formulas: data/scoring.py METRICS")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--keep",
        type=float,
        help="Cherry-LLM's rule: samples without a score or with metric > --max-ratio are dropped first; of the n "
        "left, the top int(n * KEEP) are kept (KEEP <= 1), or the top KEEP (KEEP > 1). E.g. 7 samples of which 2 "
        "have metric <= 1: --keep 0.5 keeps int(2 * 0.5) = 1",
    )
    how.add_argument("--threshold", type=float, help="keep samples whose metric is >= this value")
    parser.add_argument("--output", required=True, help="selected subset, written in the input format")
    parser.add_argument("--image-folder", help="folder that relative image paths are joined to")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--scores", help="scores JSONL (resumable; default OUTPUT.scores.jsonl)")
    parser.add_argument("--histogram", help="histogram PNG (default OUTPUT.hist.png)")
    parser.add_argument("--summary", help="summary JSON (default OUTPUT.summary.json)")
    parser.add_argument("--max-ratio", type=float, default=1.0, help="drop values above this (Cherry: 1)")
    parser.add_argument("--template", help="conversation template (default: the model's chat template)")
    parser.add_argument("--max-length", type=int, help="longest sequence (default: tokenizer.model_max_length)")
    parser.add_argument("--padding-side", default="right", choices=["right", "left"])
    parser.add_argument(
        "--keep-terminator", action="store_true", help="score the turn terminator (</s>...) with the answer"
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .scoring import METRICS, ConditionalLossScorer, compute_metric, read_scores, sample_keys

    spec = METRICS[args.metric]
    if args.keep is None and args.threshold is None:
        raise SystemExit("pass --keep FRACTION|COUNT or --threshold T")
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
        model, processor = load_model(
            args.model, dtype=args.dtype, device=str(accelerator.device), attn_implementation=args.attn_implementation
        )
        scorer = ConditionalLossScorer(
            model,
            processor,
            template=args.template,
            batch_size=args.batch_size,
            max_length=args.max_length,
            padding_side=args.padding_side,
            exclude_terminator=not args.keep_terminator,
            accelerator=accelerator,
        )
        records = scorer.score(data.samples, spec.contexts, scores_path=scores_path, answers_mode=spec.answers)
        scorer_stats = dict(scorer.stats)
    else:
        if not os.path.exists(scores_path):
            raise SystemExit(f"no --model and no scores file {scores_path!r}: nothing to select from")
        records = read_scores(scores_path)
    if not is_main:
        return {}

    values: dict[int, float | None] = {}
    reasons: dict[int, str] = {}
    for i, key in enumerate(keys):
        record = records.get(key)
        value, reason = compute_metric(record, args.metric) if record else (None, "not_scored")
        values[i] = value
        if reason:
            reasons[i] = reason
    kept, dropped = select_indices(values, args.keep, args.threshold, args.max_ratio, reasons)
    written = write_selected(data, kept, args.output)

    scored = [v for v in values.values() if v is not None]
    cut = min((values[i] for i in kept), default=None)
    histogram = args.histogram or _sidecar(args.output, ".hist.png")
    write_histogram(scored, histogram, args.metric, cut, args.max_ratio)
    by_reason = Counter(dropped.values())
    for kind, n in data.read_errors.items():
        by_reason[f"malformed_{kind}"] += n
    summary = {
        "data": os.fspath(args.data),
        "metric": args.metric,
        "expression": spec.expression,
        "verified": spec.verified,
        "formula_source": spec.source,
        "keep": args.keep,
        "threshold": args.threshold,
        "max_ratio": args.max_ratio,
        "total": len(keys) + sum(data.read_errors.values()),
        "scored": len(scored),
        "kept": written,
        "dropped": len(dropped) + sum(data.read_errors.values()),
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

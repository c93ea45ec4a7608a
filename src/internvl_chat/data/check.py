"""Pre-flight check of a training file: bad records, bad images, token lengths (image tokens counted).

    from internvl_chat.data.check import check_file

    report = check_file("llava.json", image_folder="images/", encoder=SampleEncoder(processor))
    report = check_file("llava.json", encoder=SampleEncoder.from_tokenizer(tokenizer, "vicuna_v1", 576))
    print(report.format())           # issues by kind, the first examples, the length table
    report.plot("lengths.png")       # token-length histogram with the max_length line
    report.errors                    # number of samples that training would reject

Reported (each with sample id and file): malformed records (``unknown_role``, ``empty_conversation``,
``no_answer``, ``image_count`` -- more or fewer ``<image>`` than images), ``missing_image`` / ``corrupt_image``
(every image is opened and decoded, in a thread pool), ``mask`` (the template cannot build the labels), and the
warnings ``empty_turn``. With an encoder, every valid sample is tokenized exactly as training does (template,
piecewise ``<image>`` tokenization, ``image_seq_length`` tokens per image) and the lengths go into a histogram
table with the number of samples over ``max_length`` (``model_max_length`` by default).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..templates import drops_leading_assistant
from .dataset import load_sample_images
from .formats import DataError, empty_turns, read_samples

logger = logging.getLogger(__name__)

__all__ = ["CheckReport", "check_file"]

ERROR_KINDS = (
    "bad_record",
    "unknown_role",
    "empty_conversation",
    "no_answer",
    "image_count",
    "missing_image",
    "corrupt_image",
    "mask",
)


@dataclasses.dataclass
class CheckReport:
    """Result of :func:`check_file`. ``issues`` are dicts ``{kind, severity, id, source, detail}``."""

    path: str
    total: int = 0
    issues: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    image_tokens: list[int] = dataclasses.field(default_factory=list)
    max_length: int | None = None
    image_seq_length: int | None = None

    def add(self, kind: str, sample_id: Any, source: Any, detail: str, severity: str = "error") -> None:
        self.issues.append({"kind": kind, "severity": severity, "id": sample_id, "source": source, "detail": detail})

    @property
    def counts(self) -> Counter:
        return Counter(issue["kind"] for issue in self.issues)

    @property
    def errors(self) -> int:
        """Number of distinct samples with at least one error (what training would reject)."""
        return len({(i["source"], str(i["id"])) for i in self.issues if i["severity"] == "error"})

    @property
    def over_length(self) -> int:
        if self.max_length is None:
            return 0
        return sum(1 for n in self.lengths if n > self.max_length)

    def histogram(self, bins: int = 10) -> list[tuple[int, int, int]]:
        """``[(low, high, count)]`` over the token lengths (``high`` inclusive)."""
        if not self.lengths:
            return []
        lo, hi = min(self.lengths), max(self.lengths)
        width = max(1, -(-(hi - lo + 1) // bins))
        rows = []
        for b in range(bins):
            start, end = lo + b * width, lo + (b + 1) * width - 1
            if start > hi:
                break
            rows.append((start, end, sum(1 for n in self.lengths if start <= n <= end)))
        return rows

    def format(self, examples: int = 5) -> str:
        lines = [f"{self.path}: {self.total} samples, {self.errors} with errors"]
        counts = self.counts
        if counts:
            lines.append("")
            lines.append(f"{'issue':<20} {'severity':<8} {'count':>7}")
            for kind, n in sorted(counts.items()):
                severity = next(i["severity"] for i in self.issues if i["kind"] == kind)
                lines.append(f"{kind:<20} {severity:<8} {n:>7}")
            lines.append("")
            for kind in sorted(counts):
                for issue in [i for i in self.issues if i["kind"] == kind][:examples]:
                    lines.append(f"  [{kind}] {issue['source']}: sample {issue['id']!r}: {issue['detail']}")
        if self.lengths:
            lines.append("")
            with_images = f", {self.image_seq_length} per image" if self.image_seq_length else ""
            lines.append(f"token lengths (image tokens included{with_images}):")
            lines.append(f"{'tokens':>15} {'samples':>8}")
            for start, end, n in self.histogram():
                lines.append(f"{f'{start}-{end}':>15} {n:>8}")
            ordered = sorted(self.lengths)
            pct = {p: ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] for p in (50, 90, 99)}
            lines.append(
                f"min {ordered[0]}, median {pct[50]}, p90 {pct[90]}, p99 {pct[99]}, max {ordered[-1]}, "
                f"mean {sum(ordered) / len(ordered):.1f}"
            )
            if self.max_length is not None:
                lines.append(
                    f"over max_length {self.max_length}: {self.over_length} of {len(self.lengths)} samples "
                    f"({100 * self.over_length / len(self.lengths):.2f}%)"
                )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        """Writes the token-length histogram (PNG) with the ``max_length`` limit as a red line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        if self.lengths:
            ax.hist(self.lengths, bins=min(50, max(5, len(set(self.lengths)))), color="#4c72b0")
        if self.max_length is not None:
            ax.axvline(self.max_length, color="red", linestyle="--", label=f"max_length {self.max_length}")
            ax.legend()
        ax.set_xlabel("tokens per sample (image tokens included)")
        ax.set_ylabel("samples")
        ax.set_title(f"{os.path.basename(self.path)}: {len(self.lengths)} samples, {self.over_length} over the limit")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "total": self.total,
            "errors": self.errors,
            "counts": dict(self.counts),
            "over_length": self.over_length,
            "max_length": self.max_length,
            "histogram": self.histogram(),
            "issues": [{**i, "id": str(i["id"])} for i in self.issues],
        }


def _check_images(sample: dict[str, Any]) -> DataError | None:
    try:
        load_sample_images(sample)
    except DataError as err:
        return err
    return None


def check_file(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    encoder: Any = None,
    verify_images: bool = True,
    workers: int = 4,
) -> CheckReport:
    """Checks every record of ``path`` (any format of :func:`read_samples`); never raises on bad data.

    Args:
        encoder: a :class:`~internvl_chat.data.encoding.SampleEncoder` (or anything with its ``encode``,
            ``max_length`` and ``image_seq_length``, e.g. a training collator) for token lengths and label masks;
            ``None`` skips the length part. Its ``max_length`` is the over-length limit.
        verify_images: open and decode every image (``False``: only structural checks).
        workers: threads for image decoding.
    """
    from tqdm.auto import tqdm

    errors: list[DataError] = []
    samples = read_samples(path, image_folder=image_folder, on_error="skip", errors=errors)
    report = CheckReport(path=os.fspath(path))
    report.total = len(samples) + len(errors)
    for err in errors:
        report.add(err.kind, err.sample_id, err.source, err.detail)
    if encoder is not None:
        report.max_length = encoder.max_length
        report.image_seq_length = encoder.image_seq_length

    bad_images: set[int] = set()
    if verify_images:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(_check_images, (samples[i] for i in range(len(samples))))
            for i, err in enumerate(tqdm(results, total=len(samples), desc="images", disable=len(samples) < 1000)):
                if err is not None:
                    report.add(err.kind, err.sample_id, err.source, err.detail)
                    bad_images.add(i)

    for i in tqdm(range(len(samples)), desc="tokenizing", disable=len(samples) < 1000):
        sample = samples[i]
        for turn in empty_turns(sample):
            report.add("empty_turn", sample["id"], sample["source"], f"turn {turn} is empty", severity="warning")
        if drops_leading_assistant(sample.get("messages") or []):
            detail = "the first turn is the assistant's; dropped as the original preprocessing does (not trained on)"
            report.add("leading_assistant", sample["id"], sample["source"], detail, severity="warning")
        if encoder is None:
            continue
        try:
            enc = encoder.encode(sample)
        except DataError as err:
            report.add(err.kind, err.sample_id, err.source, err.detail)
            continue
        report.lengths.append(enc["length"])
        report.image_tokens.append(enc["num_images"] * encoder.image_seq_length)
    if report.over_length:
        logger.warning("%s: %d samples exceed max_length %s", path, report.over_length, report.max_length)
    return report

"""What every task module shares: the question record (`Sample`), the command-line context (`TaskContext`), the
registry row (`Task`), the protocol prompt lines and the small scoring helpers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
MC_SUFFIX_CN = "请直接回答选项字母。"
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
OCR_PREFIX = "Reference OCR token: "
MME_YES_NO = "Please answer yes or no."
LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass
class Sample:
    """One question: ``prompt`` is the user text (the image placeholder is added by the chat template)."""

    id: Any
    prompt: str
    image: Any = None  # path, bytes, base64 string, PIL image, or None (text-only)
    target: Any = None  # task-specific ground truth (answers list, label, letter...); None when unknown
    meta: dict = dataclasses.field(default_factory=dict)
    uid: str | None = None  # set by `ensure_unique_keys` when the file repeats an id (LLaVA's MME file does)

    @property
    def key(self) -> str:
        """The id predictions are stored under: unique within a task."""
        return self.uid or str(self.id)


def ensure_unique_keys(samples: list[Sample]) -> list[Sample]:
    """Gives repeated ids a ``#n`` suffix (second occurrence ``#2``...), deterministically in file order."""
    seen: dict[str, int] = {}
    for s in samples:
        base = str(s.id)
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            s.uid = f"{base}#{seen[base]}"
    return samples


@dataclasses.dataclass
class TaskContext:
    """What a reader / scorer gets from the command line."""

    data: str
    image_folder: str | None = None
    annotations: str | None = None
    split: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    judge: Any = None  # a judge.JudgeClient for judged tasks
    output: str | None = None  # the task's output folder (judge caches, submission files)
    answers: dict = dataclasses.field(default_factory=dict)  # {key: answer-file record} (answer ids for reviews)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    family: str
    description: str
    reader: Callable[[TaskContext], list[Sample]]
    scorer: Callable[[list[Sample], dict[str, str], TaskContext], dict]
    max_new_tokens: int = 128
    submission: Callable[[list[Sample], dict[str, str], TaskContext, str], str | None] | None = None
    judged: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    reference_key: str | None = None  # key of the seed numbers in report.SEED_SCORES
    judge_model: str | None = None  # the judge model the official grader uses (judged tasks)

    def read(self, ctx: TaskContext) -> list[Sample]:
        """The task's questions, with unique keys."""
        return ensure_unique_keys(self.reader(ctx))

    def score(self, samples: list[Sample], predictions: dict[str, str], ctx: TaskContext) -> dict:
        """Scores ``predictions`` ({key: generated text}); ``{"main": None}`` when there is no ground truth."""
        return self.scorer(samples, predictions, ctx)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def scored(samples, preds):
    """(sample, prediction) pairs of the questions with ground truth; a missing prediction counts as ""."""
    return [(s, preds.get(s.key, "")) for s in samples if s.target is not None]


def no_ground_truth(samples) -> dict:
    return {"main": None, "metric": None, "count": len(samples), "note": "no ground truth: predictions only"}


def option_on(ctx: TaskContext, name: str, default: str = "false") -> bool:
    """A boolean ``--option name=...`` (1 / true / yes)."""
    return str(ctx.options.get(name, default)).lower() in ("1", "true", "yes")

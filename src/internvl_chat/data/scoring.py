"""Conditional-loss scorer and the data-selection metrics of Cherry-LLM / LLaVAR-2 (IFD, VFD, mIFD, FFD).

For each sample and each scored assistant answer A the scorer measures ``s(A | context)``, the mean token
cross-entropy of A's tokens under the model, for one or more *contexts* (:data:`CONTEXTS`):

=======  ==========================================================================================================
``none``  nothing: the template's scaffolding around a lone assistant turn (``system ASSISTANT: A</s>``), the
          analogue of Cherry-LLM's ``"### Response:" + output``
``q``     the question Q (the user turn before A) as text, images removed
``iq``    the images I and Q (the sample's images moved into Q's turn, as LLaVA places them)
``iqf``   I, Q and the fact text F: the conversation before Q, kept as earlier turns (for a duo-conversation, the
          first, extractive QA pair)
=======  ==========================================================================================================

The metrics are ratios of these losses, all defined in ONE registry, :data:`METRICS`, so a formula can be corrected
in one place (the raw losses are stored, so a corrected formula needs no rescoring)::

    ifd  = s(A|Q) / s(A)                          Cherry-LLM (verified against its code)
    vfd  = s(A|I,Q) / s(A|Q)                      LLaVAR-2, *unverified reconstruction* (reference.md §10)
    mifd = VFD × IFD  (= s(A|I,Q) / s(A))         LLaVAR-2, *unverified*
    ffd  = s(A2|I,F,Q2) / s(A2|I,Q2)              LLaVAR-2 duo-conversations, *form unverified*

Usage::

    from internvl_chat.data.scoring import ConditionalLossScorer, METRICS, compute_metric

    scorer = ConditionalLossScorer(model, processor, batch_size=16)          # template: processor's chat template
    records = scorer.score(samples, contexts=METRICS["mifd"].contexts, scores_path="scores.jsonl")
    value, reason = compute_metric(records["000123"], "mifd")               # reason is None when value is valid

Scoring is batched (right or left padding with an attention mask and explicit position ids, so padding never
changes a loss), runs in the model's dtype (bf16 on GPU; the cross-entropy is taken in float32), only projects the
hidden states of A's positions through the LM head (a 32k-vocab logits tensor for every position of a 2k-token
batch would dominate memory), and splits the samples over processes with accelerate (``accelerate launch``): every
process appends to its own ``scores.jsonl.rankN`` file, which the main process merges into ``scores.jsonl``.
It is resumable: every finished sample is one JSONL line, written as soon as its chunk is done; a rerun skips the
samples already scored with the needed contexts. A missing / corrupt image, an over-long or unmaskable sample is
recorded with its id and reason (``status: "error"``), logged and counted -- never fatal -- and retried on a rerun.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .dataset import load_sample_images
from .formats import IMAGE_TOKEN, DataError, count_image_blocks

logger = logging.getLogger(__name__)

__all__ = [
    "CONTEXTS",
    "METRICS",
    "ConditionalLossScorer",
    "MetricSpec",
    "build_context_messages",
    "compute_metric",
    "read_scores",
    "sample_keys",
]

CONTEXTS: dict[str, str] = {
    "none": "s(A): the answer alone (template scaffolding only)",
    "q": "s(A|Q): the question as text",
    "iq": "s(A|I,Q): the images and the question",
    "iqf": "s(A|I,Q,F): images, question and the fact text (the earlier turns)",
}


# ---------------------------------------------------------------------------------------------- the formulas
@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One selection metric: the contexts it needs, which answers it scores and its formula.

    ``answers``: ``"all"`` scores every assistant answer and pools their tokens per context (a token-weighted mean,
    so a single-turn sample gets exactly Cherry's per-sample loss); ``"duo_second"`` needs exactly two answers
    (a duo-conversation) and scores the second one only.
    """

    name: str
    contexts: tuple[str, ...]
    formula: Callable[[Mapping[str, float]], float]
    expression: str
    answers: str
    verified: bool
    source: str


# [IMPORTANT] The ONE place where the metrics are defined. Only IFD is verified (Cherry-LLM's data_by_IFD.py:
# mean CE of the output given the prompt / mean CE of the output after "### Response:"). VFD, mIFD and FFD are
# reconstructions from the LLaVAR-2 paper's prose (reference.md §10); correct them here. Scores JSONL files hold
# the raw losses, so `internvl-chat select --scores FILE` recomputes a corrected metric without rescoring.
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            name="ifd",
            contexts=("none", "q"),
            formula=lambda s: s["q"] / s["none"],
            expression="IFD = s(A|Q) / s(A)",
            answers="all",
            verified=True,
            source="Cherry-LLM (Li et al. 2024), cherry_seletion/data_by_IFD.py",
        ),
        MetricSpec(
            name="vfd",
            contexts=("q", "iq"),
            formula=lambda s: s["iq"] / s["q"],
            expression="VFD = s(A|I,Q) / s(A|Q)",
            answers="all",
            verified=False,
            source="LLaVAR-2 (unverified reconstruction, reference.md §10)",
        ),
        MetricSpec(
            name="mifd",
            contexts=("none", "q", "iq"),
            # Written as the product on purpose: if VFD or IFD is corrected above, mirror it here.
            formula=lambda s: (s["iq"] / s["q"]) * (s["q"] / s["none"]),
            expression="mIFD = VFD × IFD = s(A|I,Q)/s(A|Q) × s(A|Q)/s(A)",
            answers="all",
            verified=False,
            source="LLaVAR-2 (unverified reconstruction, reference.md §10)",
        ),
        MetricSpec(
            name="ffd",
            contexts=("iq", "iqf"),
            formula=lambda s: s["iqf"] / s["iq"],
            expression="FFD = s(A2|I,F,Q2) / s(A2|I,Q2), F = the first (extractive) QA pair",
            answers="duo_second",
            verified=False,
            source="LLaVAR-2 duo-conversations (form unverified, reference.md §10)",
        ),
    )
}


def compute_metric(record: Mapping[str, Any], metric: str) -> tuple[float | None, str | None]:
    """The metric value of one scores record → ``(value, None)``, or ``(None, reason)`` when it has none.

    Reasons: the record's own error (``corrupt_image``, ``missing_image``, ``over_length``, ``not_duo``,
    ``empty_answer``...), ``missing_context`` (scored without a context the metric needs), ``zero_loss`` (a zero
    denominator) or ``not_finite``.
    """
    spec = METRICS[metric]
    if record.get("status") != "ok":
        return None, record.get("reason", "error")
    if record.get("answers_mode") != spec.answers:
        return None, "missing_context"
    losses = record.get("loss", {})
    if any(c not in losses for c in spec.contexts):
        return None, "missing_context"
    try:
        value = float(spec.formula(losses))
    except ZeroDivisionError:
        return None, "zero_loss"
    if not math.isfinite(value):
        return None, "not_finite"
    return value, None


# ------------------------------------------------------------------------------------------ context messages
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join((b.get("text") or "") for b in content or [] if b.get("type") == "text")


def _has_image(content: Any) -> bool:
    if isinstance(content, str):
        return IMAGE_TOKEN in content
    return any(b.get("type") == "image" or IMAGE_TOKEN in (b.get("text") or "") for b in content or [])


def answer_turns(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the assistant turns."""
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]


def build_context_messages(sample: Mapping[str, Any], turn: int, context: str) -> tuple[list[dict], list[Any]]:
    """Messages and images that put the assistant answer at ``turn`` after ``context`` (see :data:`CONTEXTS`).

    The answer is always the *last* message, so its tokens are the last supervised span of the encoding. A system
    message of the sample is kept in every context (it is template scaffolding, like the default system prompt).
    Images: the ones whose placeholders occur up to ``turn`` (images are listed in placeholder order).
    """
    messages = list(sample["messages"])
    answer = messages[turn]
    if _has_image(answer.get("content")):
        raise DataError("an assistant turn holds an image; cannot score it", sample.get("id"), sample.get("source"))
    head = [messages[0]] if messages and messages[0].get("role") == "system" else []
    start = len(head)
    question = messages[turn - 1] if turn - 1 >= start and messages[turn - 1].get("role") == "user" else None
    n_images = count_image_blocks(messages[: turn + 1])
    images = list(sample.get("images") or [])[:n_images]
    answer_msg = {"role": "assistant", "content": answer.get("content")}
    # LLaVA strips a turn's text when it moves the image to the front; do the same when the image is removed.
    q_text = _text_of(question["content"]).replace(IMAGE_TOKEN, "").strip() if question else ""
    if context == "none":
        return [*head, answer_msg], []
    if context == "q":
        return [*head, {"role": "user", "content": [{"type": "text", "text": q_text}]}, answer_msg], []
    if context == "iq":
        blocks = [{"type": "image"} for _ in images] + [{"type": "text", "text": q_text}]
        return [*head, {"role": "user", "content": blocks}, answer_msg], images
    if context == "iqf":
        return [*head, *messages[start:turn], answer_msg], images
    raise ValueError(f"unknown context {context!r}; known: {sorted(CONTEXTS)}")


# ----------------------------------------------------------------------------------------------- scores file
def sample_keys(samples: Iterable[Mapping[str, Any]]) -> list[str]:
    """Stable keys for resuming: the sample id, with ``#n`` appended to the n-th repeat of a duplicated id."""
    seen: Counter = Counter()
    keys = []
    for i, sample in enumerate(samples):
        sid = str(sample.get("id", i))
        keys.append(sid if seen[sid] == 0 else f"{sid}#{seen[sid]}")
        seen[sid] += 1
    return keys


def read_scores(path: str | os.PathLike, include_parts: bool = True) -> dict[str, dict[str, Any]]:
    """Scores JSONL (plus unmerged ``.rankN`` parts) → ``{key: record}``; a later line for a key wins.

    A truncated last line (a run killed while writing) is ignored with a warning.
    """
    files = [os.fspath(path)]
    if include_parts:
        files += sorted(glob.glob(glob.escape(os.fspath(path)) + ".rank*"))
    records: dict[str, dict[str, Any]] = {}
    for file in files:
        if not os.path.exists(file):
            continue
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d: ignoring an unreadable line (interrupted write?)", file, line_no)
                    continue
                records[record["key"]] = record
    return records


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends records as JSON lines, starting on a fresh line.

    # [IMPORTANT] a run killed mid-write leaves a torn last line without "\\n"; appending right after it would glue
    # the next record onto it and lose that record too. One newline first isolates the torn line.
    """
    path = os.fspath(path)
    prefix = ""
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            prefix = "" if f.read(1) == b"\n" else "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(prefix + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()


def _merge_parts(path: str) -> None:
    parts = sorted(glob.glob(glob.escape(path) + ".rank*"))
    if not parts:
        return
    with open(path, "a", encoding="utf-8") as out:
        for part in parts:
            with open(part, encoding="utf-8") as f:
                for line in f:
                    # Only complete lines: a torn last line of a killed process is dropped (rescored later).
                    if line.endswith("\n"):
                        out.write(line)
    for part in parts:
        os.remove(part)


# ----------------------------------------------------------------------------------------------------- scorer
@dataclasses.dataclass
class _Request:
    key: str
    answer: int  # position in the record's answer list
    context: str
    input_ids: list[int]
    targets: list[int]  # 1 for A's tokens (the loss counts these), else 0
    n_images: int


class ConditionalLossScorer:
    """Mean token cross-entropy of assistant answers under a model, for configurable contexts.

    Args:
        model: an ``InternVLChatForConditionalGeneration`` (any model with ``.model(...)`` returning hidden states
            aligned with ``input_ids`` and an output embedding), already on its device and in its dtype.
        processor: its ``InternVLChatProcessor``.
        template: conversation template (registered name or jinja); ``None``: ``processor.chat_template``.
        batch_size: sequences per forward pass.
        max_length: longest sequence in tokens (image tokens count); ``None``: ``tokenizer.model_max_length``.
            Longer samples are recorded as ``over_length`` (never truncated: a cut answer changes its loss).
        padding_side: ``"right"`` or ``"left"``; position ids are computed from the attention mask, so both give
            the same losses.
        exclude_terminator: drop the turn terminator (``</s>``, ``<|end|>``...) from A's tokens, as Cherry-LLM
            scores the output text only; ``False`` scores exactly the training labels of the turn.
        chunk_size: samples processed (images loaded, scored, written) at a time; the unit of resumption.
        template_kwargs: template variables (``double_bos``...).
        accelerator: an ``accelerate.Accelerator`` (default: a new one) for multi-process runs.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        template: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        padding_side: str = "right",
        exclude_terminator: bool = True,
        chunk_size: int | None = None,
        template_kwargs: dict[str, Any] | None = None,
        accelerator: Any = None,
        max_image_pixels: int | None = None,
        show_progress: bool = True,
    ):
        from .encoding import SampleEncoder as VisionChatCollator

        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model = model
        self.processor = processor
        # The collator gives exactly the training tokenization (piecewise around <image>, labels from the
        # template's generation spans); over_length="error" so the scorer sees every too-long sample.
        self.collator = VisionChatCollator(
            processor, template=template, max_length=max_length, over_length="error", template_kwargs=template_kwargs
        )
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.exclude_terminator = exclude_terminator
        self.chunk_size = chunk_size or max(4 * batch_size, 16)
        self.max_image_pixels = max_image_pixels
        self.show_progress = show_progress
        self._accelerator = accelerator
        self._stop_ids = self._terminator_ids(template)
        self.stats: Counter = Counter()

    # ------------------------------------------------------------------------------------------- helpers
    def _terminator_ids(self, template: str | None) -> list[list[int]]:
        from ..templates import TEMPLATES, resolve_template_name

        stops: list[str] = []
        if isinstance(template, str) and "{%" not in template:
            stops = list(TEMPLATES[resolve_template_name(template)].stop_strings)
        else:
            stops = list(getattr(self.processor, "stop_strings", None) or [])
        out = []
        for stop in stops:
            ids = self.tokenizer.encode(stop, add_special_tokens=False)
            if ids:
                out.append(ids)
        return out

    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            # [IMPORTANT] without cpu=True accelerate ignores torchrun's RANK / WORLD_SIZE on a machine without CUDA
            # (every process would think it is alone and score everything).
            self._accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return self._accelerator

    def _target_mask(self, labels: list[int]) -> list[int]:
        """Mask of the *last* supervised span (the answer being scored), optionally without its terminator."""
        pad = self.collator.label_pad
        mask = [0] * len(labels)
        end = len(labels)
        while end > 0 and labels[end - 1] == pad:
            end -= 1
        start = end
        # [IMPORTANT] earlier answers (context iqf) are supervised too in the encoding; the answer being scored is
        # the last message, so it is the last contiguous run of labels (user turns always separate the runs).
        while start > 0 and labels[start - 1] != pad:
            start -= 1
        if self.exclude_terminator:
            run = labels[start:end]
            for stop in self._stop_ids:
                # Any suffix of the stop's ids: "\n" is ["▁", "<0x0A>"] alone but only "<0x0A>" after text.
                cut = next((k for k in range(len(stop), 0, -1) if len(run) > k and run[-k:] == stop[-k:]), 0)
                if cut:
                    end -= cut
                    break
        for i in range(start, end):
            mask[i] = 1
        return mask

    def _requests(self, key: str, sample: Mapping[str, Any], turns: list[int], contexts: Sequence[str]):
        reqs = []
        for a, turn in enumerate(turns):
            for context in contexts:
                messages, images = build_context_messages(sample, turn, context)
                enc = self.collator.encode({**sample, "messages": messages, "images": images})
                if self.collator.max_length is not None and enc["length"] > self.collator.max_length:
                    raise DataError(
                        f"{enc['length']} tokens in context {context!r} > max_length {self.collator.max_length}",
                        sample.get("id"),
                        sample.get("source"),
                        "over_length",
                    )
                targets = self._target_mask(enc["labels"])
                # The first token is never predicted (no position before it).
                if sum(targets[1:]) == 0:
                    raise DataError(
                        f"answer at turn {turn} has no token", sample.get("id"), sample.get("source"), "empty_answer"
                    )
                reqs.append(_Request(key, a, context, enc["input_ids"], targets, enc["num_images"]))
        return reqs

    @torch.no_grad()
    def losses(self, requests: Sequence[_Request], pixel_values: Mapping[str, torch.Tensor]) -> list[float]:
        """Mean CE over each request's target tokens (one forward per ``batch_size`` requests)."""
        out = [0.0] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            for i, value in zip(idx, self._forward([requests[i] for i in idx], pixel_values)):
                out[i] = value
        return out

    def _forward(self, batch: Sequence[_Request], pixel_values: Mapping[str, torch.Tensor]) -> list[float]:
        model = self.model
        device = next(model.parameters()).device
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), self.collator.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.zeros((len(batch), width), dtype=torch.bool)
        pixels = []
        for row, r in enumerate(batch):
            n = len(r.input_ids)
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(r.input_ids)
            attention[row, cols] = 1
            targets[row, cols] = torch.tensor(r.targets, dtype=torch.bool)
            if r.n_images:
                pixels.append(pixel_values[r.key][: r.n_images])
        # [IMPORTANT] explicit positions from the mask: with left padding the default positions would start at the
        # pad count, which shifts absolute position embeddings and RoPE's numerics; here padding changes nothing.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if pixels:
            dtype = next(model.model.vision_tower.parameters()).dtype
            kwargs["pixel_values"] = torch.cat(pixels).to(device=device, dtype=dtype)
        hidden = model.model(
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        # Position j predicts token j+1: only the positions before a target go through the LM head.
        predict = targets[:, 1:].to(device)
        states = hidden[:, :-1][predict]
        logits = model.get_output_embeddings()(states).float()
        token_loss = F.cross_entropy(logits, ids[:, 1:].to(device)[predict], reduction="none")
        rows = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(predict)[predict]
        sums = torch.zeros(len(batch), device=device, dtype=torch.float32).index_add_(0, rows, token_loss)
        counts = predict.sum(-1).clamp(min=1)
        return (sums / counts).tolist()

    # ------------------------------------------------------------------------------------------- driver
    def _score_chunk(self, chunk: list[tuple[str, int, Mapping[str, Any]]], contexts, answers_mode) -> list[dict]:
        records: dict[str, dict[str, Any]] = {}
        requests: list[_Request] = []
        pixel_values: dict[str, torch.Tensor] = {}
        for key, index, sample in chunk:
            base = {"key": key, "id": sample.get("id"), "index": index}
            try:
                turns = answer_turns(sample["messages"])
                if answers_mode == "duo_second":
                    if len(turns) != 2:
                        raise DataError(
                            f"{len(turns)} answers, a duo-conversation has 2",
                            sample.get("id"),
                            sample.get("source"),
                            "not_duo",
                        )
                    turns = turns[1:]
                reqs = self._requests(key, sample, turns, contexts)
                if any(r.n_images for r in reqs):
                    images = load_sample_images(sample, self.max_image_pixels)
                    pixel_values[key] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            except DataError as err:
                self.stats[err.kind] += 1
                logger.warning("sample %r (%s): not scored: %s [%s]", sample.get("id"), key, err.detail, err.kind)
                records[key] = {**base, "status": "error", "reason": err.kind, "detail": err.detail}
                continue
            requests.extend(reqs)
            records[key] = {
                **base,
                "status": "ok",
                "answers_mode": answers_mode,
                "answers": [{"turn": t, "loss": {}, "tokens": {}} for t in turns],
            }
        for r, value in zip(requests, self.losses(requests, pixel_values)):
            answer = records[r.key]["answers"][r.answer]
            answer["loss"][r.context] = value
            answer["tokens"][r.context] = int(sum(r.targets[1:]))
        for record in records.values():
            if record["status"] != "ok":
                continue
            self.stats["scored"] += 1
            # Token-weighted pooling over the scored answers (= the per-sample mean CE for single-turn samples).
            record["loss"], record["tokens"] = {}, {}
            for context in contexts:
                n = sum(a["tokens"][context] for a in record["answers"])
                total = sum(a["loss"][context] * a["tokens"][context] for a in record["answers"])
                record["loss"][context] = total / n
                record["tokens"][context] = n
        return [records[key] for key, _, _ in chunk]

    def score(
        self,
        samples: Sequence[Mapping[str, Any]],
        contexts: Sequence[str],
        scores_path: str | os.PathLike | None = None,
        answers_mode: str = "all",
        limit: int | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Scores ``samples`` (normalised samples) → ``{key: record}`` for all samples (see :func:`sample_keys`).

        ``scores_path``: JSONL file appended to as chunks finish; samples already there (``status: "ok"`` with
        every context of ``contexts`` and the same ``answers_mode``) are not scored again. ``limit``: stop after
        scoring this many chunks in this process (tests use it to simulate an interrupted run).

        Record: ``{"key", "id", "index", "status": "ok", "answers_mode", "answers": [{"turn", "loss": {ctx: mean
        CE}, "tokens": {ctx: n}}], "loss": {ctx: pooled mean CE}, "tokens": {ctx: n}}`` or ``{"key", "id",
        "index", "status": "error", "reason", "detail"}``.
        """
        unknown = [c for c in contexts if c not in CONTEXTS]
        if unknown:
            raise ValueError(f"unknown contexts {unknown}; known: {sorted(CONTEXTS)}")
        acc = self.accelerator
        path = os.fspath(scores_path) if scores_path is not None else None
        if path and acc.is_main_process:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _merge_parts(path)  # leftovers of an interrupted multi-process run
        acc.wait_for_everyone()
        keys = sample_keys(samples)
        done = read_scores(path) if path else {}

        def finished(record):
            return (
                record is not None
                and record.get("status") == "ok"
                and record.get("answers_mode") == answers_mode
                and all(c in record.get("loss", {}) for c in contexts)
            )

        pending = [i for i, key in enumerate(keys) if not finished(done.get(key))]
        logger.info("scoring %d of %d samples (%d already scored)", len(pending), len(keys), len(keys) - len(pending))
        out_path = None
        if path:
            out_path = path if acc.num_processes == 1 else f"{path}.rank{acc.process_index}"
        mine: list[int]
        with acc.split_between_processes(pending) as mine:
            mine = list(mine)
        new: list[dict[str, Any]] = []
        from tqdm.auto import tqdm

        progress = tqdm(
            total=len(mine), desc="scoring", unit="sample", disable=not (self.show_progress and acc.is_main_process)
        )
        for n_chunk, c in enumerate(range(0, len(mine), self.chunk_size)):
            if limit is not None and n_chunk >= limit:
                break
            chunk = [(keys[i], i, samples[i]) for i in mine[c : c + self.chunk_size]]
            records = self._score_chunk(chunk, contexts, answers_mode)
            new.extend(records)
            if out_path:
                append_jsonl(out_path, records)
            progress.update(len(chunk))
        progress.close()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            new = gather_object(new)
            # Counts of every process (the summary reports the whole run, not rank 0's share).
            totals: Counter = Counter()
            for stats in gather_object([dict(self.stats)]):
                totals.update(stats)
            self.stats = totals
            acc.wait_for_everyone()
            if path and acc.is_main_process:
                _merge_parts(path)
            acc.wait_for_everyone()
        for record in new:
            done[record["key"]] = record
        if self.stats:
            logger.info("scorer: %s", dict(self.stats))
        return {key: done[key] for key in keys if key in done}

"""Conditional-loss scorer and the data-selection metrics of Cherry-LLM / LLaVAR-2 (IFD, VFD, mIFD, FFD).

Every metric is a ratio of two mean token cross-entropies ("losses") of one *unit* of a conversation, where a unit
is a QA pair (a user turn and the assistant answer after it) or a duo (two consecutive QA pairs: an extractive
Q1 A1, then a self-explaining Q2 A2; a conversation is cut into duos every 4 turns). Units are named by ``qa_id``,
the index of their first question among the conversation's turns (a leading system message not counted), as the
released LLaVAR-2 scripts write them. The losses (:data:`LOSSES`), each computed on a small conversation built
from the unit alone::

    a|q        text model    A given Q (the whole prompt of the template; images removed)
    a          text model    A after the bare assistant header only (no system preamble; Cherry's "### Response:")
    qa|i       vision model  Q and A (from Q's first token) given the images, placed in front of Q
    qa         vision model  Q and A without the images
    qa2|i,qa1  vision model  Q2 and A2 given the images (in front of Q1), Q1 and A1
    qa2|i      vision model  Q2 and A2 given the images (in front of Q2)

and the metrics, defined in ONE registry, :data:`METRICS`::

    ifd  = s(a|q) / s(a)                              Cherry-LLM's IFD (text model)
    vfd  = s(qa|i) / s(qa)                            LLaVAR-2 VFD.py (vision model)
    mifd = VFD × IFD = s(qa|i)/s(qa) × s(a|q)/s(a)    LLaVAR-2: two models, the factors do not cancel
    ffd  = s(qa2|i,qa1) / s(qa2|i)                    LLaVAR-2 FFD.py, per duo (vision model)

The *vision model* is the model being scored with (ours); the *text model* is a text-only causal LM given by the
user (LLaVAR-2 used a Phi-3-mini) or, by default, our model's own language model run without images and with our
template. Where we differ from the released scripts and why: ``docs/data-selection.md``.

Usage::

    from internvl_chat.data.scoring import ConditionalLossScorer, METRICS, compute_metric

    scorer = ConditionalLossScorer(model, processor, batch_size=16)         # text model: ours, without images
    records = scorer.score(samples, "mifd", scores_path="scores.jsonl")
    for unit in records["000123"]["units"]:
        value, reason = compute_metric(unit, "mifd")                        # reason is None when value is valid

Each scored span is found in the *rendered text* (the question's and the answer's characters) and mapped to
tokens with the tokenizer's offsets, exactly as training labels are (:func:`~internvl_chat.templates.encode_chat`),
so it is the same for every template and tokenizer. Scoring is batched (right or left padding with explicit
position ids, so padding never changes a loss), runs in the model's dtype (the cross-entropy is taken in float32
by :func:`~internvl_chat.modeling.modeling_internvl_chat.supervised_cross_entropy`, only on scored positions), and
splits the samples over processes (accelerate; the rule of :mod:`~internvl_chat.data.sharding`): every process
appends to its own ``scores.jsonl.rankN``, which the main process merges into ``scores.jsonl``. It is resumable:
every finished sample is one JSONL line; a rerun skips the samples already scored with the needed losses by the
same models. A missing / corrupt image, an over-long unit, an unpaired conversation is recorded with its reason --
never fatal -- and retried on a rerun.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..modeling.modeling_internvl_chat import supervised_cross_entropy
from ..templates import encode_chat, render_chat
from .dataset import load_sample_images
from .formats import IMAGE_TOKEN, DataError
from .sharding import Ranks, ShardedJsonl, read_jsonl, shard

logger = logging.getLogger(__name__)

__all__ = [
    "LOSSES",
    "METRICS",
    "TERMINATOR_POLICIES",
    "ConditionalLossScorer",
    "LossSpec",
    "MetricSpec",
    "TextRenderer",
    "build_unit_conversation",
    "compute_metric",
    "read_scores",
    "sample_keys",
    "units_of",
]

TERMINATOR_POLICIES = ("auto", "exclude", "include")


# ---------------------------------------------------------------------------------------------- the formulas
@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One conditional loss: which model computes it, on which unit, which span is scored.

    ``span``: ``"answer"`` (A's tokens), ``"bare"`` (A's tokens after the bare assistant header) or ``"qa"`` (from
    the scored question's first token to the end of the answer). ``terminator``: whether the answer's turn
    terminator (``</s>``, ``<|end|>``...) is scored under the ``auto`` policy (as the published code does).
    """

    name: str
    model: str  # "vision" | "text"
    unit: str  # "pair" | "duo"
    span: str
    terminator: bool
    description: str

    @property
    def images(self) -> bool:
        """Whether the loss is conditioned on the images."""
        return self.model == "vision" and "|i" in self.name


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("a|q", "text", "pair", "answer", False, "s(A | Q): the answer given the question (text model)"),
        LossSpec("a", "text", "pair", "bare", False, "s(A): the answer after the bare assistant header (text model)"),
        LossSpec("qa|i", "vision", "pair", "qa", True, "s(Q,A | I): question and answer given the images"),
        LossSpec("qa", "vision", "pair", "qa", True, "s(Q,A): question and answer without the images"),
        LossSpec(
            "qa2|i,qa1", "vision", "duo", "qa", True, "s(Q2,A2 | I,Q1,A1): the second pair after images and the first"
        ),
        LossSpec("qa2|i", "vision", "duo", "qa", True, "s(Q2,A2 | I): the second pair after the images alone"),
    )
}


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One selection metric: the unit it scores, the losses it needs and its formula.

    ``formula_verified``: the formula follows published code. No selection *rule* of LLaVAR-2 is published (only
    Cherry-LLM's, for IFD): ``rule_verified`` says whether the default rule is the published one.
    """

    name: str
    unit: str
    losses: tuple[str, ...]
    formula: Callable[[Mapping[str, float]], float]
    expression: str
    formula_verified: bool
    rule_verified: bool
    source: str


# [IMPORTANT] The ONE place where the metrics are defined. Scores files hold the raw losses, so
# `internvl-chat select --scores FILE` recomputes a corrected formula without rescoring.
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            name="ifd",
            unit="pair",
            losses=("a|q", "a"),
            formula=lambda s: s["a|q"] / s["a"],
            expression="IFD = s(A|Q) / s(A)",
            formula_verified=True,
            rule_verified=True,
            source="Cherry-LLM cherry_seletion/data_analysis.py + data_by_IFD.py",
        ),
        MetricSpec(
            name="vfd",
            unit="pair",
            losses=("qa|i", "qa"),
            formula=lambda s: s["qa|i"] / s["qa"],
            expression="VFD = s(Q,A|I) / s(Q,A)",
            formula_verified=True,
            rule_verified=False,
            source="LLaVAR-2 Hybrid-Instruct_data_selection/mIFD/VFD.py",
        ),
        MetricSpec(
            name="mifd",
            unit="pair",
            losses=("qa|i", "qa", "a|q", "a"),
            # Written as the product of the two registry entries' formulas: mirror a correction of either here.
            formula=lambda s: (s["qa|i"] / s["qa"]) * (s["a|q"] / s["a"]),
            expression="mIFD = VFD × IFD = s(Q,A|I)/s(Q,A) [vision model] × s(A|Q)/s(A) [text model]",
            formula_verified=True,
            rule_verified=False,
            source="LLaVAR-2 Hybrid-Instruct_data_selection/mIFD/VFD.py × mIFD/IFD.py",
        ),
        MetricSpec(
            name="ffd",
            unit="duo",
            losses=("qa2|i,qa1", "qa2|i"),
            formula=lambda s: s["qa2|i,qa1"] / s["qa2|i"],
            expression="FFD = s(Q2,A2|I,Q1,A1) / s(Q2,A2|I), per duo (4 turns)",
            formula_verified=True,
            rule_verified=False,
            source="LLaVAR-2 Hybrid-Instruct_data_selection/FFD.py",
        ),
    )
}


def compute_metric(unit: Mapping[str, Any] | None, metric: str) -> tuple[float | None, str | None]:
    """The metric value of one scored unit → ``(value, None)``, or ``(None, reason)`` when it has none.

    Reasons: the unit's own error (``over_length``, ``not_duo``, ``empty_answer``...), a loss skipped
    (``no_image``: VFD / FFD of a sample without images),
    ``missing_loss`` (scored without a loss the metric needs), ``zero_loss`` (a zero denominator), ``not_finite``.
    """
    if unit is None:
        return None, "not_scored"
    if unit.get("status", "ok") != "ok":
        return None, unit.get("reason", "error")
    losses = unit.get("loss", {})
    spec = METRICS[metric]
    skipped = [unit.get("skipped", {})[name] for name in spec.losses if name in unit.get("skipped", {})]
    if unit.get("unit") == spec.unit and skipped:
        return None, skipped[0]
    if unit.get("unit") != spec.unit or any(name not in losses for name in spec.losses):
        return None, "missing_loss"
    try:
        value = float(spec.formula(losses))
    except ZeroDivisionError:
        return None, "zero_loss"
    if not math.isfinite(value):
        return None, "not_finite"
    return value, None


# ------------------------------------------------------------------------------------------------- the units
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join((b.get("text") or "") for b in content or [] if b.get("type") == "text")


def _n_images(content: Any) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_TOKEN)
    return sum(
        1 if b.get("type") == "image" else (b.get("text") or "").count(IMAGE_TOKEN)
        for b in content or []
        if b.get("type") in ("image", "text")
    )


def _turns(sample: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(leading system messages, the other turns), checking that the turns alternate user / assistant."""
    messages = list(sample.get("messages") or [])
    head = [messages[0]] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(head) :]
    roles = [m.get("role") for m in turns]
    if not turns or len(turns) % 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        raise DataError(
            f"turns {roles} are not user/assistant pairs; cannot cut the conversation into QA pairs",
            sample.get("id"),
            sample.get("source"),
            "not_paired",
        )
    for m in turns:
        if m.get("role") == "assistant" and _n_images(m.get("content")):
            raise DataError(
                "an assistant turn holds an image; cannot score it", sample.get("id"), sample.get("source")
            )
    return head, turns


def units_of(sample: Mapping[str, Any], unit: str) -> list[tuple[int, int | None]]:
    """``[(qa_id, turns)]`` of a sample: QA pairs (``qa_id`` 0, 2, 4...) or duos (0, 4, 8...).

    ``turns`` is the unit's number of turns, or ``None`` for an incomplete trailing duo (2 turns left).
    """
    _, turns = _turns(sample)
    if unit == "pair":
        return [(i, 2) for i in range(0, len(turns), 2)]
    if unit == "duo":
        return [(i, 4 if i + 4 <= len(turns) else None) for i in range(0, len(turns), 4)]
    raise ValueError(f"unknown unit {unit!r}")


def _question(message: Mapping[str, Any]) -> str:
    # The question's text with its image placeholders removed and stripped, as LLaVA writes a turn whose image
    # was moved to the front (and as the released scripts strip "<image>\n" before placing the image).
    return _text_of(message.get("content")).replace(IMAGE_TOKEN, "").strip()


def _user(text: str, n_images: int = 0) -> dict[str, Any]:
    return {"role": "user", "content": [*([{"type": "image"}] * n_images), {"type": "text", "text": text}]}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def build_unit_conversation(
    sample: Mapping[str, Any], qa_id: int, loss: str
) -> tuple[list[dict[str, Any]], int, str, str]:
    """The conversation on which ``loss`` of the unit at ``qa_id`` is computed → ``(messages, n_images, question,
    answer)``: the scored answer is the last message; ``question`` is the text of the scored question (the last
    user turn). A system message of the sample is kept (it is part of the template's prompt); the images (all of
    the sample's) are placed in front of the first question when the loss is conditioned on them.
    """
    spec = LOSSES[loss]
    head, turns = _turns(sample)
    n_images = len(sample.get("images") or [])
    if spec.unit == "pair":
        q, a = _question(turns[qa_id]), _text_of(turns[qa_id + 1].get("content"))
        if loss in ("a|q", "a", "qa"):
            return [*head, _user(q), _assistant(a)], 0, q, a
        return [*head, _user(q, n_images), _assistant(a)], n_images, q, a
    q1, a1 = _question(turns[qa_id]), _text_of(turns[qa_id + 1].get("content"))
    q2, a2 = _question(turns[qa_id + 2]), _text_of(turns[qa_id + 3].get("content"))
    if loss == "qa2|i,qa1":
        return [*head, _user(q1, n_images), _assistant(a1), _user(q2), _assistant(a2)], n_images, q2, a2
    return [*head, _user(q2, n_images), _assistant(a2)], n_images, q2, a2


# ------------------------------------------------------------------------------------------------ rendering
# Writes the already rendered text back verbatim, with the scored characters as the one generation span, so that
# encode_chat tokenizes it exactly as a training sample (piecewise around <image>, the BOS rule) and maps the span to
# tokens with the tokenizer's offsets (the same rule as training labels).
_PASSTHROUGH = (
    "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{%- generation -%}{{- m['content'] -}}"
    "{%- endgeneration -%}{%- else -%}{{- m['content'] -}}{%- endif -%}{%- endfor -%}"
)


def _back_over_spaces(text: str, pos: int, floor: int) -> int:
    while pos > floor and text[pos - 1] == " ":
        pos -= 1
    return pos


class TextRenderer:
    """Renders conversations for one model and encodes a character span of the text as the scored tokens.

    ``template``: one of our registered templates / a jinja source (rendered with :func:`render_chat`), or
    ``None`` to use the tokenizer's own chat template (``apply_chat_template``, string contents). ``image_token``
    etc.: LLaVA-style piecewise tokenization (our model); ``None`` for a text-only model.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str | None,
        template_kwargs: Mapping[str, Any] | None = None,
        image_token: str | None = None,
        image_token_id: int | None = None,
        image_seq_length: int = 1,
    ):
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the text model's tokenizer has no chat template; pass a template")
        self.tokenizer = tokenizer
        self.template = template
        self.template_kwargs = dict(template_kwargs or {})
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.header = self._assistant_header()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        if self.template is not None:
            return render_chat(messages, self.template, add_generation_prompt, **self.template_kwargs)
        plain = [{"role": m["role"], "content": _text_of(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )

    def _assistant_header(self) -> str:
        """The text the template writes to open an assistant turn (its generation prompt), e.g. ``ASSISTANT:``."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        closed, opened = self.render(probe, False), self.render(probe, True)
        eos = getattr(self.tokenizer, "eos_token", None)
        # Some templates close a conversation that does not end in a generation prompt with the eos token.
        for base in (closed, closed[: -len(eos)] if eos and closed.endswith(eos) else None):
            if base is not None and opened.startswith(base):
                return opened[len(base) :].lstrip()
        raise ValueError("cannot find the assistant header of the template (its generation prompt)")

    def _bos_prefix(self, text: str) -> str:
        bos = getattr(self.tokenizer, "bos_token", None)
        n = 0
        while bos and text.startswith(bos * (n + 1)):
            n += 1
        return (bos or "") * n

    def span(
        self, messages: list[dict[str, Any]], span: str, question: str, answer: str, terminator: bool
    ) -> tuple[str, int, int]:
        """``(text, start, end)``: the rendered conversation and the scored characters (see :class:`LossSpec`)."""
        full = self.render(messages, False)
        prompt = self.render(messages[:-1], True)
        if not full.startswith(prompt):
            raise ValueError("the template renders the answer's prompt differently inside the conversation")
        a_start = full.find(answer, len(prompt)) if answer else -1
        if a_start < 0 and answer.strip():
            answer = answer.strip()
            a_start = full.find(answer, len(prompt))
        if a_start < 0:
            raise DataError("the answer is empty or not found in the rendered text", kind="empty_answer")
        end = len(full) if terminator else a_start + len(answer)
        # A separator space in front of the answer / question belongs to its first token (SentencePiece's "▁Blue",
        # a lone "▁" before a digit), as in the training labels: the span starts at that space.
        a_start = _back_over_spaces(full, a_start, len(prompt))
        if span == "answer":
            return full, a_start, end
        if span == "qa":
            q_start = full.rfind(question, 0, len(prompt)) if question else -1
            return full, (_back_over_spaces(full, q_start, 0) if q_start >= 0 else a_start), end
        if span == "bare":
            # Cherry-LLM: the answer after "### Response:" alone -- the assistant header, no system preamble; the
            # tokenizer's BOS (added by the tokenizer, or written by the template) stays.
            prefix = self._bos_prefix(full) + self.header
            bare = prefix + full[len(prompt) :]
            shift = len(prefix) - len(prompt)
            return bare, a_start + shift, end + shift
        raise ValueError(f"unknown span {span!r}")

    def encode(self, text: str, start: int, end: int) -> tuple[list[int], list[int], int]:
        """``(input_ids, scored-token mask, number of images)`` of ``text`` with ``text[start:end]`` scored."""
        pieces = [
            {"role": "user", "content": text[:start]},
            {"role": "assistant", "content": text[start:end]},
            {"role": "user", "content": text[end:]},
        ]
        enc = encode_chat(
            self.tokenizer,
            pieces,
            _PASSTHROUGH,
            image_token=self.image_token,
            image_seq_length=self.image_seq_length,
            image_token_id=self.image_token_id,
        )
        n_images = len(enc["image_positions"]) // max(self.image_seq_length, 1)
        return enc["input_ids"], enc["assistant_masks"], n_images


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


def _scores_store(path: str | os.PathLike, acc: Any = None) -> ShardedJsonl:
    """The scores JSONL as a `ShardedJsonl` (one part per process while several score; data.sharding)."""
    return ShardedJsonl(path, lambda record: record["key"], Ranks(acc) if acc is not None else None, sync=False)


def read_scores(path: str | os.PathLike, include_parts: bool = True) -> dict[str, dict[str, Any]]:
    """Scores JSONL (plus unmerged ``.rankN`` parts) → ``{key: record}``; a later line for a key wins.

    A truncated last line (a run killed while writing) is ignored with a warning.
    """
    if include_parts:
        return _scores_store(path).read()
    return {record["key"]: record for record in read_jsonl(path) if "key" in record}


# ----------------------------------------------------------------------------------------------------- scorer
@dataclasses.dataclass
class _Request:
    key: str
    unit: int  # position in the record's unit list
    loss: str
    input_ids: list[int]
    labels: list[int]  # the token where scored, else -100
    n_images: int


class ConditionalLossScorer:
    """Per-unit conditional losses (:data:`LOSSES`) of samples under a vision model and a text model.

    Args:
        model: an ``InternVLChatForConditionalGeneration`` already on its device and in its dtype (the vision model).
        processor: its ``InternVLChatProcessor``.
        template: conversation template of ``model`` (registered name or jinja); ``None``: the processor's.
        text_model / text_tokenizer: a text-only causal LM (``AutoModelForCausalLM``) and its tokenizer for the
            IFD losses; ``None``: ``model`` itself run without images, with ``template``.
        text_template: the text model's template; ``None``: its tokenizer's chat template.
        model_name / text_model_name: how the scores file and the summary name the two models (a rerun with other
            names rescores).
        batch_size: sequences per forward pass.
        max_length: longest sequence in tokens (image tokens count); ``None``: ``tokenizer.model_max_length`` when
            real. Longer units are recorded as ``over_length`` (never truncated: a cut answer changes its loss).
        padding_side: ``"right"`` or ``"left"``; positions come from the attention mask, both give the same losses.
        terminator: ``"auto"`` scores the answer's turn terminator where the published code does (VFD / FFD
            spans run to the end of the turn; Cherry's IFD scores the output text only); ``"exclude"`` /
            ``"include"`` force it for every loss.
        chunk_size: samples processed (images loaded, scored, written) at a time; the unit of resumption.
        template_kwargs: template variables (``double_bos``...).
        accelerator: an ``accelerate.Accelerator`` (default: a new one) for multi-process runs.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        template: str | None = None,
        text_model: Any = None,
        text_tokenizer: Any = None,
        text_template: str | None = None,
        model_name: str | None = None,
        text_model_name: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        padding_side: str = "right",
        terminator: str = "auto",
        chunk_size: int | None = None,
        template_kwargs: dict[str, Any] | None = None,
        accelerator: Any = None,
        max_image_pixels: int | None = None,
        show_progress: bool = True,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if terminator not in TERMINATOR_POLICIES:
            raise ValueError(f"terminator must be one of {TERMINATOR_POLICIES}, got {terminator!r}")
        if (text_model is None) != (text_tokenizer is None):
            raise ValueError("pass text_model and text_tokenizer together")
        template = template if template is not None else getattr(processor, "chat_template", None)
        if not template:
            raise ValueError("no conversation template: pass template='vicuna_v1' (or another name)")
        self.model = model
        self.processor = processor
        self.renderers: dict[str, TextRenderer] = {
            "vision": TextRenderer(
                processor.tokenizer,
                template,
                template_kwargs,
                image_token=processor.image_token,
                image_token_id=processor.image_token_id,
                image_seq_length=processor.image_seq_length,
            )
        }
        self.models: dict[str, Any] = {"vision": model, "text": text_model if text_model is not None else model}
        if text_model is None:
            self.renderers["text"] = self.renderers["vision"]
        else:
            self.renderers["text"] = TextRenderer(text_tokenizer, text_template)
        name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
        self.model_names = {
            "vision": name,
            "text": text_model_name
            or (
                f"{name} (its language model, no image)"
                if text_model is None
                else getattr(text_model.config, "_name_or_path", "text model")
            ),
        }
        limit = getattr(processor.tokenizer, "model_max_length", None)
        self.max_length = max_length if max_length is not None else (int(limit) if limit and limit < 10**8 else None)
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.terminator = terminator
        self.chunk_size = chunk_size or max(4 * batch_size, 16)
        self.max_image_pixels = max_image_pixels
        self.show_progress = show_progress
        self._accelerator = accelerator
        self.stats: Counter = Counter()

    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            # [IMPORTANT] without cpu=True accelerate ignores torchrun's RANK / WORLD_SIZE on a machine without CUDA
            # (every process would think it is alone and score everything).
            self._accelerator = Accelerator(cpu=not torch.cuda.is_available())
        return self._accelerator

    def scores_terminator(self, loss: str) -> bool:
        """Whether the answer's turn terminator is scored for ``loss`` under this scorer's policy."""
        return LOSSES[loss].terminator if self.terminator == "auto" else self.terminator == "include"

    def config(self, losses: Sequence[str]) -> dict[str, Any]:
        """What a stored loss depends on besides the data: the model that computed it and the terminator rule."""
        return {
            name: {"model": self.model_names[LOSSES[name].model], "terminator": self.scores_terminator(name)}
            for name in losses
        }

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, sample: Mapping[str, Any], qa_id: int, loss: str) -> tuple[list[int], list[int], int]:
        """``(input_ids, labels, n_images)`` of one loss of one unit; labels are -100 outside the scored span."""
        spec = LOSSES[loss]
        renderer = self.renderers[spec.model]
        messages, n_images, question, answer = build_unit_conversation(sample, qa_id, loss)
        try:
            text, start, end = renderer.span(messages, spec.span, question, answer, self.scores_terminator(loss))
            ids, mask, n_encoded = renderer.encode(text, start, end)
        except DataError:
            raise
        except ValueError as err:
            raise DataError(f"cannot render / tokenize: {err}", kind="mask") from err
        if n_encoded != n_images:
            raise DataError(
                f"the rendered text holds {n_encoded} image placeholders, not {n_images}", kind="image_count"
            )
        labels = [tok if m else -100 for tok, m in zip(ids, mask)]
        # The first token is never predicted (no position before it).
        if all(label == -100 for label in labels[1:]):
            raise DataError("the scored span has no token", kind="empty_answer")
        if self.max_length is not None and len(ids) > self.max_length:
            raise DataError(f"{len(ids)} tokens > max_length {self.max_length}", kind="over_length")
        return ids, labels, n_images

    @torch.no_grad()
    def losses(self, requests: Sequence[_Request], pixel_values: Mapping[str, torch.Tensor], role: str) -> list[float]:
        """Mean CE over each request's scored tokens (one forward per ``batch_size`` requests) with model ``role``."""
        out = [0.0] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            for i, value in zip(idx, self._forward([requests[i] for i in idx], pixel_values, role)):
                out[i] = value
        return out

    def _forward(self, batch: Sequence[_Request], pixel_values: Mapping[str, torch.Tensor], role: str) -> list[float]:
        model = self.models[role]
        device = next(model.parameters()).device
        pad_id = self.renderers[role].tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.renderers[role].tokenizer.eos_token_id or 0
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        pixels = []
        for row, r in enumerate(batch):
            n = len(r.input_ids)
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(r.input_ids)
            attention[row, cols] = 1
            labels[row, cols] = torch.tensor(r.labels)
            if r.n_images:
                pixels.append(pixel_values[r.key][: r.n_images])
        # [IMPORTANT] explicit positions from the mask: with left padding the default positions would start at the
        # pad count, which shifts absolute position embeddings and RoPE's numerics; here padding changes nothing.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if pixels:
            dtype = next(model.model.vision_tower.parameters()).dtype
            kwargs["pixel_values"] = torch.cat(pixels).to(device=device, dtype=dtype)
        # The decoder body only (hidden states); the LM head is applied to the scored positions alone.
        body = model.model if model is self.model else getattr(model, model.base_model_prefix)
        hidden = body(
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        labels = labels.to(device)
        sums = supervised_cross_entropy(model.get_output_embeddings(), hidden, labels, reduction="row_sum")
        counts = (labels[:, 1:] != -100).sum(-1).clamp(min=1)
        return (sums / counts).tolist()

    # ------------------------------------------------------------------------------------------- driver
    def _score_chunk(self, chunk: list[tuple[str, int, Mapping[str, Any]]], losses: Sequence[str]) -> list[dict]:
        records: dict[str, dict[str, Any]] = {}
        requests: dict[str, list[_Request]] = {"vision": [], "text": []}
        pixel_values: dict[str, torch.Tensor] = {}
        kinds = sorted({LOSSES[name].unit for name in losses}, reverse=True)  # "pair" first
        for key, index, sample in chunk:
            base = {"key": key, "id": sample.get("id"), "index": index}
            try:
                units = [(kind, qa_id, n) for kind in kinds for qa_id, n in units_of(sample, kind)]
                needs_images = any(LOSSES[name].images for name in losses)
                if needs_images and sample.get("images"):
                    images = load_sample_images(sample, self.max_image_pixels)
                    pixel_values[key] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            except DataError as err:
                self.stats[err.kind] += 1
                logger.warning("sample %r (%s): not scored: %s [%s]", sample.get("id"), key, err.detail, err.kind)
                records[key] = {**base, "status": "error", "reason": err.kind, "detail": err.detail}
                continue
            record_units = []
            for u, (kind, qa_id, n_turns) in enumerate(units):
                unit: dict[str, Any] = {"unit": kind, "qa_id": qa_id, "status": "ok", "loss": {}, "tokens": {}}
                record_units.append(unit)
                try:
                    if n_turns is None:
                        raise DataError("an incomplete duo (2 turns left, a duo has 4)", kind="not_duo")
                    unit_requests = []
                    for name in losses:
                        spec = LOSSES[name]
                        if spec.unit != kind:
                            continue
                        if spec.images and not sample.get("images"):
                            # Only this loss is undefined: the unit keeps its other losses (IFD of a text sample).
                            unit.setdefault("skipped", {})[name] = "no_image"
                            continue
                        ids, labels, n_images = self.encode(sample, qa_id, name)
                        unit_requests.append((spec.model, _Request(key, u, name, ids, labels, n_images)))
                except DataError as err:
                    self.stats[f"unit_{err.kind}"] += 1
                    unit.update(status="error", reason=err.kind, detail=err.detail)
                    continue
                for role, request in unit_requests:
                    requests[role].append(request)
            records[key] = {**base, "status": "ok", "config": self.config(losses), "units": record_units}
        for role, role_requests in requests.items():
            for r, value in zip(role_requests, self.losses(role_requests, pixel_values, role)):
                unit = records[r.key]["units"][r.unit]
                unit["loss"][r.loss] = value
                unit["tokens"][r.loss] = sum(1 for label in r.labels[1:] if label != -100)
        for record in records.values():
            if record["status"] == "ok":
                self.stats["scored"] += 1
                self.stats["units"] += len(record["units"])
        return [records[key] for key, _, _ in chunk]

    def _finished(self, record: Mapping[str, Any] | None, losses: Sequence[str]) -> bool:
        if record is None or record.get("status") != "ok":
            return False
        config = record.get("config", {})
        if any(config.get(name) != want for name, want in self.config(losses).items()):
            return False
        kinds = {LOSSES[name].unit for name in losses}
        present = {u.get("unit") for u in record.get("units", [])}
        if not kinds <= present:
            return False
        return all(
            u.get("status") != "ok"
            or all(
                name in u["loss"] or name in u.get("skipped", {}) for name in losses if LOSSES[name].unit == u["unit"]
            )
            for u in record["units"]
            if u.get("unit") in kinds
        )

    @staticmethod
    def _merge(old: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
        """Keeps the losses of an earlier record (other metrics) that the new one did not recompute."""
        if not old or old.get("status") != "ok" or new.get("status") != "ok":
            return new
        units = {(u["unit"], u["qa_id"]): u for u in new["units"]}
        config = dict(old.get("config", {}))
        config.update(new["config"])
        for u in old.get("units", []):
            mine = units.get((u["unit"], u["qa_id"]))
            if mine is None:
                new["units"].append(u)
            elif u.get("status") == "ok" and mine.get("status") == "ok":
                for name, value in u["loss"].items():
                    if name not in mine["loss"] and name in config:
                        mine["loss"][name] = value
                        mine["tokens"][name] = u["tokens"][name]
                for name, reason in u.get("skipped", {}).items():
                    if name not in mine["loss"]:
                        mine.setdefault("skipped", {}).setdefault(name, reason)
        new["config"] = {name: value for name, value in config.items()}
        new["units"].sort(key=lambda u: (u["unit"] != "pair", u["qa_id"]))
        return new

    def score(
        self,
        samples: Sequence[Mapping[str, Any]],
        metric: str | Sequence[str],
        scores_path: str | os.PathLike | None = None,
        limit: int | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Scores ``samples`` (normalised samples) → ``{key: record}`` (see :func:`sample_keys`).

        ``metric``: a metric name (its losses are computed) or a list of loss names. ``scores_path``: JSONL file
        appended to as chunks finish; samples already there with every needed loss by the same models are not
        scored again. ``limit``: stop after this many chunks in this process (tests simulate an interrupted run).

        Record: ``{"key", "id", "index", "status": "ok", "config": {loss: {"model", "terminator"}}, "units":
        [{"unit": "pair" | "duo", "qa_id", "status": "ok", "loss": {name: mean CE}, "tokens": {name: n}} or
        {"unit", "qa_id", "status": "error", "reason", "detail"}]}``, or ``{"key", "id", "index", "status":
        "error", "reason", "detail"}`` for a sample that could not be cut into units or whose images failed.
        """
        losses = list(METRICS[metric].losses) if isinstance(metric, str) else list(metric)
        unknown = [name for name in losses if name not in LOSSES]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; known: {sorted(LOSSES)}")
        acc = self.accelerator
        ranks = Ranks(acc)
        path = os.fspath(scores_path) if scores_path is not None else None
        store = _scores_store(path, acc) if path else None
        if store is not None and ranks.is_main:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            store.merge()  # leftovers of an interrupted multi-process run
        ranks.barrier()
        keys = sample_keys(samples)
        done = store.read() if store is not None else {}
        pending = [i for i, key in enumerate(keys) if not self._finished(done.get(key), losses)]
        logger.info("scoring %d of %d samples (%d already scored)", len(pending), len(keys), len(keys) - len(pending))
        # [IMPORTANT] every process has read the scores before any appends to its part.
        ranks.barrier()
        mine = shard(pending, ranks.rank, ranks.world_size)
        new: list[dict[str, Any]] = []
        from tqdm.auto import tqdm

        progress = tqdm(
            total=len(mine), desc="scoring", unit="sample", disable=not (self.show_progress and ranks.is_main)
        )
        for n_chunk, c in enumerate(range(0, len(mine), self.chunk_size)):
            if limit is not None and n_chunk >= limit:
                break
            chunk = [(keys[i], i, samples[i]) for i in mine[c : c + self.chunk_size]]
            records = [self._merge(done.get(r["key"]), r) for r in self._score_chunk(chunk, losses)]
            new.extend(records)
            if store is not None:
                store.append(records)
            progress.update(len(chunk))
        progress.close()
        if ranks.world_size > 1:
            new = [record for part in ranks.gather(new) for record in part]
            # Counts of every process (the summary reports the whole run, not rank 0's share).
            totals: Counter = Counter()
            for stats in ranks.gather(dict(self.stats)):
                totals.update(stats)
            self.stats = totals
            if store is not None:
                store.finish()
            ranks.barrier()
        for record in new:
            done[record["key"]] = record
        if self.stats:
            logger.info("scorer: %s", dict(self.stats))
        return {key: done[key] for key in keys if key in done}

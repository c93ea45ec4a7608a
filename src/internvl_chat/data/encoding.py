"""Sample encoding: one normalised sample → ``input_ids`` / ``labels`` / image positions, and the length policy.

    from internvl_chat.data.encoding import SampleEncoder

    encoder = SampleEncoder(processor)                                # template = processor.chat_template
    encoder = SampleEncoder(processor, template="plain", max_length=2048, over_length="truncate")
    encoder = SampleEncoder.from_tokenizer(tokenizer, "vicuna_v1", image_seq_length=576)   # lengths only
    enc = encoder.encode(sample)       # {"input_ids", "labels", "length", "num_images", "image_positions"}
    enc = encoder.fit(sample, enc)     # the over-length policy: enc, a truncated enc, or None (skipped)

This is the tokenization every consumer shares: the training collator
(:class:`~internvl_chat.training.collator.VisionChatCollator`, which adds batching, padding and packing),
``internvl-chat data check`` (token lengths, label masks) and the answer scorer (:mod:`internvl_chat.data.scoring`).
No image is opened here.

Labels: the tokens of the template's ``{% generation %}`` spans (each answer and its terminator), everything else
``label_pad`` (-100), image tokens always. Ids are exactly what ``InternVLChatProcessor`` produces for the rendered
text (piecewise tokenization around ``<image>``, see ``templates.encode_chat(image_token=...)``). A sample whose
mask cannot be built (no assistant turn, a span without tokens, placeholder / image count mismatch) raises
:class:`DataError` with its id and source: samples are never silently trained on all -100 labels.

Over-long samples (> ``max_length`` tokens, image tokens included) follow ``over_length``: ``"error"`` raises with
the id; ``"skip"`` drops the sample; ``"truncate"`` cuts text tokens at the right end -- never inside (or before)
the image tokens: a sample whose images would be cut, or which keeps no supervised token, is skipped. Each case is
logged with the sample id and counted in :attr:`SampleEncoder.stats` (``over_length``, ``truncated``,
``skipped_over_length``; shared with the DataLoader workers).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from ..templates import encode_chat
from .dataset import SharedCounters
from .formats import DataError, count_image_blocks, sample_images

logger = logging.getLogger(__name__)

__all__ = ["LENGTH_COUNTERS", "OVER_LENGTH_POLICIES", "SampleEncoder"]

OVER_LENGTH_POLICIES = ("error", "skip", "truncate")
LENGTH_COUNTERS = ("over_length", "truncated", "skipped_over_length")
# Tokenizers without a real limit report a huge sentinel as model_max_length (int(1e30)).
_NO_LIMIT = 10**8


class SampleEncoder:
    """Tokenizes message-list samples with a chat template and builds their labels; applies the length policy.

    Args:
        processor: anything with ``tokenizer``, ``image_token``, ``image_token_id``, ``image_seq_length`` and
            (when ``template`` is ``None``) ``chat_template`` -- an ``InternVLChatProcessor``.
        template: a registered template name (``vicuna_v1``, ``plain``, ``phi3_instruct``, ``llama3``...) or a
            jinja source; ``None`` uses ``processor.chat_template`` (what ``create`` / ``convert`` stored).
        max_length: longest sample in tokens (image tokens count); ``None`` takes ``tokenizer.model_max_length``
            when that is a real limit (LLaVA's rule), else no limit.
        over_length: ``"error"`` | ``"skip"`` | ``"truncate"`` (see the module docstring).
        label_pad: label of ignored positions (-100, the ignore index of the loss).
        template_kwargs: template variables, e.g. ``{"double_bos": True}`` for ``llama3``.
        add_special_tokens: ``None``: BOS unless the rendered text starts with it (processor rule).
        stats: counters to add the length events to (must hold :data:`LENGTH_COUNTERS`); ``None`` makes new ones.
    """

    def __init__(
        self,
        processor: Any,
        template: str | None = None,
        max_length: int | None = None,
        over_length: str = "error",
        label_pad: int = -100,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool | None = None,
        stats: SharedCounters | None = None,
    ):
        if over_length not in OVER_LENGTH_POLICIES:
            raise ValueError(f"over_length must be one of {OVER_LENGTH_POLICIES}, got {over_length!r}")
        self.tokenizer = processor.tokenizer
        self.template = template if template is not None else getattr(processor, "chat_template", None)
        if not self.template:
            raise ValueError(
                "encoding samples needs a conversation template: pass template='vicuna_v1' (or another name) or "
                "use a processor with a chat_template."
            )
        if max_length is None:
            limit = getattr(self.tokenizer, "model_max_length", None)
            max_length = int(limit) if limit is not None and limit < _NO_LIMIT else None
        self.max_length = max_length
        self.over_length = over_length
        self.label_pad = label_pad
        self.template_kwargs = dict(template_kwargs or {})
        self.add_special_tokens = add_special_tokens
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.image_seq_length = processor.image_seq_length
        pad_id = self.tokenizer.pad_token_id
        self.pad_token_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token to pad with.")
        self.stats = stats if stats is not None else SharedCounters(LENGTH_COUNTERS)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        template: str,
        image_seq_length: int,
        max_length: int | None = None,
        image_token: str = "<image>",
        **kwargs: Any,
    ) -> SampleEncoder:
        """An encoder from a bare tokenizer (``data check --tokenizer``); ``image_token`` is added if missing."""
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        parts = SimpleNamespace(
            tokenizer=tokenizer,
            image_token=image_token,
            image_token_id=tokenizer.convert_tokens_to_ids(image_token),
            image_seq_length=image_seq_length,
        )
        return cls(parts, template=template, max_length=max_length, **kwargs)

    def encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Tokenizes one sample (no image is opened): ``{"input_ids", "labels", "length", "num_images",
        "image_positions"}``, before any length policy. Raises :class:`DataError` naming the sample."""
        sid, src = sample.get("id"), sample.get("source")
        messages = sample.get("messages")
        if not messages:
            raise DataError("empty conversation (no messages)", sid, src, "empty_conversation")
        images = sample_images(sample)
        placeholders = count_image_blocks(messages)
        if placeholders != len(images):
            raise DataError(
                f"{placeholders} image placeholder(s) but {len(images)} image(s)", sid, src, kind="image_count"
            )
        try:
            encoding = encode_chat(
                self.tokenizer,
                messages,
                self.template,
                add_special_tokens=self.add_special_tokens,
                image_token=self.image_token,
                image_seq_length=self.image_seq_length,
                image_token_id=self.image_token_id,
                **self.template_kwargs,
            )
        except Exception as err:  # jinja raise_exception (unknown role), span mapping errors...
            kind = "unknown_role" if "unsupported role" in str(err) else "mask"
            raise DataError(f"cannot render / tokenize: {err}", sid, src, kind=kind) from err
        ids = encoding["input_ids"]
        n_images = len(encoding["image_positions"]) // max(self.image_seq_length, 1)
        if n_images != len(images):
            # e.g. `plain` with an image in an assistant turn the template drops, or text that spells "<image>"
            raise DataError(
                f"the rendered text holds {n_images} {self.image_token!r} but the sample has {len(images)} image(s)",
                sid,
                src,
                kind="image_count",
            )
        labels = [tok if m else self.label_pad for tok, m in zip(ids, encoding["assistant_masks"])]
        if all(label == self.label_pad for label in labels):
            raise DataError(
                "no supervised token (no assistant answer in the rendered text); refusing to train on an all -100 "
                "sample",
                sid,
                src,
                kind="no_answer",
            )
        return {
            "input_ids": ids,
            "labels": labels,
            "length": len(ids),
            "num_images": n_images,
            "image_positions": encoding["image_positions"],
        }

    def fit(self, sample: dict[str, Any], enc: dict[str, Any]) -> dict[str, Any] | None:
        """The over-length policy on ``encode(sample)``'s result: ``enc`` itself when it fits, a truncated copy,
        or ``None`` when the sample is skipped; raises :class:`DataError` under ``over_length="error"``."""
        if self.max_length is None or enc["length"] <= self.max_length:
            return enc
        sid, src = sample.get("id"), sample.get("source")
        self.stats.add("over_length")
        what = f"{enc['length']} tokens (with {enc['num_images']}×{self.image_seq_length} image tokens) > max_length"
        if self.over_length == "error":
            raise DataError(
                f"{what} {self.max_length}; use over_length='skip' or 'truncate', or raise max_length",
                sid,
                src,
                kind="over_length",
            )
        if self.over_length == "truncate":
            last_image = max(enc["image_positions"], default=-1)
            labels = enc["labels"][: self.max_length]
            # [IMPORTANT] never cut inside (or drop) image tokens: the model needs as many image tokens as features.
            if last_image < self.max_length and any(label != self.label_pad for label in labels):
                self.stats.add("truncated")
                logger.warning("truncated sample %r of %s: %s %d", sid, src, what, self.max_length)
                return {**enc, "input_ids": enc["input_ids"][: self.max_length], "labels": labels}
            reason = "the cut would fall in the image tokens" if last_image >= self.max_length else "no answer left"
            logger.warning("skipped sample %r of %s: %s %d and %s", sid, src, what, self.max_length, reason)
        else:
            logger.warning("skipped sample %r of %s: %s %d", sid, src, what, self.max_length)
        self.stats.add("skipped_over_length")
        return None

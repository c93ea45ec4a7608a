"""``VisionChatCollator``: samples → model batch, labels from the template's assistant spans, optional packing.

    from internvl_chat.training.collator import VisionChatCollator

    collator = VisionChatCollator(processor)                          # template = processor.chat_template
    collator = VisionChatCollator(processor, template="plain", max_length=2048, over_length="truncate")
    collator = VisionChatCollator(processor, packing=True)            # padding-free: one row, position ids restart
    batch = collator([dataset[0], dataset[1]])
    loss = model(**batch).loss

    # TRL 1.16 (independent of TRL; it is just a callable):
    #   SFTTrainer(model, args=SFTConfig(..., dataset_kwargs={"skip_prepare_dataset": True},
    #              remove_unused_columns=False), train_dataset=dataset.to_hf_dataset(), data_collator=collator,
    #              processing_class=processor)      # TRL refuses torch Datasets: pass the HF view
    collator.stats.as_dict()   # {"samples", "batches", "over_length", "truncated", "skipped_over_length", ...}

Input samples are dicts with ``messages`` (HF message list; image blocks and/or literal ``<image>``), ``images``
(PIL images, or paths / bytes / ``{"bytes", "path"}`` dicts that are opened here, in the DataLoader worker, in
placeholder order; may be missing for text-only), and optionally ``id`` and ``source`` (used in every error
message) -- the items of :class:`~internvl_chat.data.VisionChatDataset`, or the rows of its ``to_hf_dataset()``
(TRL's ``SFTTrainer`` accepts only HF datasets).

Output (unpacked): ``input_ids``, ``attention_mask``, ``labels`` of shape (B, L), right-padded with the tokenizer's
pad id / 0 / -100; ``pixel_values`` (N, 3, S, S) with all images of the batch in order (absent when the batch has
no image). Packed (``packing=True``): every sample of the call is concatenated in one row (1, T) with
``position_ids`` restarting at 0 per sample, no ``attention_mask`` (transformers then builds a block-diagonal causal
mask from the position ids for eager / SDPA / flex, ``masking_utils.find_packed_sequence_indices``), and the
varlen kwargs ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, (S+1,)) and ``max_length_q`` / ``max_length_k`` (int)
that transformers' flash-attention paths read (5.17 and 5.23); eager / SDPA ignore them. Packed batches also hold
``use_cache=False``: with a cache, transformers does not detect the packing and lets samples see each other.

Labels (reference.md §3): the tokens of the template's ``{% generation %}`` spans (each answer and its terminator),
everything else -100, image tokens and padding always -100. Ids are exactly what ``InternVLChatProcessor``
produces for the rendered text (piecewise tokenization around ``<image>``, see ``encode_chat(image_token=...)``).
A sample whose mask cannot be built (no assistant turn, a span without tokens, placeholder / image count mismatch)
raises :class:`DataError` with its id and source: samples are never silently trained on all -100 labels.

Over-long samples (> ``max_length`` tokens, image tokens included) follow ``over_length``: ``"error"`` raises with
the id; ``"skip"`` drops the sample from the batch; ``"truncate"`` cuts text tokens at the right end -- never
inside (or before) the image tokens: a sample whose images would be cut, or which keeps no supervised token, is
skipped. Each case is logged with the sample id and counted in :attr:`VisionChatCollator.stats` (shared with the
DataLoader workers).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from ..data.dataset import SharedCounters, load_sample_images
from ..data.formats import DataError, count_image_blocks
from ..templates import encode_chat

logger = logging.getLogger(__name__)

__all__ = ["OVER_LENGTH_POLICIES", "VisionChatCollator"]

OVER_LENGTH_POLICIES = ("error", "skip", "truncate")
# Tokenizers without a real limit report a huge sentinel as model_max_length (int(1e30)).
_NO_LIMIT = 10**8


class VisionChatCollator:
    """Builds training batches for InternVL-Chat / LLaVA models from message-list samples.

    Args:
        processor: an ``InternVLChatProcessor`` (tokenizer, image processor, ``image_token``,
            ``image_seq_length``, ``chat_template``).
        template: a registered template name (``vicuna_v1``, ``plain``, ``phi3_instruct``, ``llama3``...) or a
            jinja source; ``None`` uses ``processor.chat_template`` (what ``create`` / ``convert`` stored).
        max_length: longest sample in tokens (image tokens count); ``None`` takes ``tokenizer.model_max_length``
            when that is a real limit (LLaVA's rule), else no limit.
        over_length: ``"error"`` | ``"skip"`` | ``"truncate"`` (see the module docstring).
        packing: padding-free packing of the whole call into one row.
        label_pad: label of ignored positions (-100, the ignore index of the loss).
        pad_to_multiple_of: pad the sequence length up to a multiple (tensor cores); packing pads the row with
            1-token dummy sequences (labels -100), which keeps them separate.
        template_kwargs: template variables, e.g. ``{"double_bos": True}`` for ``llama3``.
        add_special_tokens: ``None``: BOS unless the rendered text starts with it (processor rule).
    """

    def __init__(
        self,
        processor: Any,
        template: str | None = None,
        max_length: int | None = None,
        over_length: str = "error",
        packing: bool = False,
        label_pad: int = -100,
        pad_to_multiple_of: int | None = None,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool | None = None,
    ):
        if over_length not in OVER_LENGTH_POLICIES:
            raise ValueError(f"over_length must be one of {OVER_LENGTH_POLICIES}, got {over_length!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template if template is not None else getattr(processor, "chat_template", None)
        if not self.template:
            raise ValueError(
                "VisionChatCollator needs a conversation template: pass template='vicuna_v1' (or another name) or "
                "use a processor with a chat_template."
            )
        if max_length is None:
            limit = getattr(self.tokenizer, "model_max_length", None)
            max_length = int(limit) if limit is not None and limit < _NO_LIMIT else None
        self.max_length = max_length
        self.over_length = over_length
        self.packing = packing
        self.label_pad = label_pad
        self.pad_to_multiple_of = pad_to_multiple_of
        self.template_kwargs = dict(template_kwargs or {})
        self.add_special_tokens = add_special_tokens
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.image_seq_length = processor.image_seq_length
        pad_id = self.tokenizer.pad_token_id
        self.pad_token_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token to pad with.")
        self.stats = SharedCounters(
            ["samples", "batches", "over_length", "truncated", "skipped_over_length", "images", "supervised_tokens"]
        )

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Tokenizes one sample (no image is opened): ``{"input_ids", "labels", "length", "num_images",
        "image_positions"}``, before any length policy. Raises :class:`DataError` naming the sample."""
        sid, src = sample.get("id"), sample.get("source")
        messages = sample.get("messages")
        if not messages:
            raise DataError("empty conversation (no messages)", sid, src, "empty_conversation")
        images = _images_of(sample)
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

    def _apply_length_policy(self, sample: dict[str, Any], enc: dict[str, Any]) -> dict[str, Any] | None:
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

    # ------------------------------------------------------------------------------------------- batching
    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        encoded, images = [], []
        for sample in samples:
            enc = self._apply_length_policy(sample, self.encode(sample))
            if enc is None:
                continue
            encoded.append(enc)
            sample_images = _images_of(sample)
            if any(not isinstance(im, Image.Image) for im in sample_images):
                # Paths / bytes (HF-dataset route): opened here, in the DataLoader worker; errors name the sample.
                sample_images = load_sample_images({**sample, "images": sample_images})
            images.extend(sample_images)
        if not encoded:
            ids = [s.get("id") for s in samples]
            raise DataError(
                f"every sample of the batch exceeds max_length={self.max_length} and was skipped; filter the dataset "
                "first (VisionChatDataset.drop_over_length(collator)) so batches cannot end up empty",
                ids,
                [s.get("source") for s in samples],
                kind="over_length",
            )
        self.stats.add("samples", len(encoded))
        self.stats.add("batches")
        self.stats.add("images", len(images))
        self.stats.add("supervised_tokens", sum(sum(1 for x in e["labels"] if x != self.label_pad) for e in encoded))
        batch = self._pack(encoded) if self.packing else self._pad(encoded)
        if images:
            # Same call as InternVLChatProcessor.__call__, so pixel values equal the processor's.
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch

    def _padded_length(self, length: int) -> int:
        m = self.pad_to_multiple_of
        return length if not m else (length + m - 1) // m * m

    def _pad(self, encoded: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Right padding: training needs no left padding, and the labels of pads are ignored anyway.
        width = self._padded_length(max(len(e["input_ids"]) for e in encoded))
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), self.label_pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _pack(self, encoded: list[dict[str, Any]]) -> dict[str, Any]:
        ids, labels, positions, lengths = [], [], [], []
        for e in encoded:
            n = len(e["input_ids"])
            ids.extend(e["input_ids"])
            # [IMPORTANT] the loss shifts labels inside the row, so the last token of one sample would be trained
            # to predict the first token of the next. Unpacked, a sample's first label is never a target: make it
            # -100 here so packed and unpacked losses are equal (TRL's padding-free collator does the same).
            labels.extend([self.label_pad, *e["labels"][1:]])
            positions.extend(range(n))
            lengths.append(n)
        total = len(ids)
        extra = self._padded_length(total) - total
        # Padding as 1-token sequences (position 0 each): a pad never attends to, nor is attended by, a sample.
        ids.extend([self.pad_token_id] * extra)
        labels.extend([self.label_pad] * extra)
        positions.extend([0] * extra)
        lengths.extend([1] * extra)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu.clone(),
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            # [IMPORTANT] transformers detects packed rows from position_ids only without a cache: with the config's
            # use_cache=True, Llama creates an empty DynamicCache in forward and masking_utils then skips
            # find_packed_sequence_indices, so samples would attend to each other (the loss changes; measured on
            # 5.17 and 5.23). TRL's compute_loss also sets it; plain Trainer / hand-written loops need it here.
            "use_cache": False,
        }

    def log_stats(self, level: int = logging.INFO) -> dict[str, int]:
        """Logs and returns the counters (over-long, truncated, skipped samples...)."""
        stats = self.stats.as_dict()
        logger.log(level, "collator: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
        return stats


def _images_of(sample: dict[str, Any]) -> list[Any]:
    images = sample.get("images")
    if images is None:
        images = sample.get("image")
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]

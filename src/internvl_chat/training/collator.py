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

Tokenization, labels and the over-length policy are the data layer's
:class:`~internvl_chat.data.encoding.SampleEncoder` (``collator.encoder``; the same rules as ``data check`` and the
scorer); this module batches, pads and packs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from ..data.dataset import SharedCounters, load_sample_images
from ..data.encoding import LENGTH_COUNTERS, OVER_LENGTH_POLICIES, SampleEncoder
from ..data.formats import DataError, sample_images

logger = logging.getLogger(__name__)

__all__ = ["OVER_LENGTH_POLICIES", "VisionChatCollator"]


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
        self.processor = processor
        self.stats = SharedCounters(["samples", "batches", *LENGTH_COUNTERS, "images", "supervised_tokens"])
        self.encoder = SampleEncoder(
            processor,
            template=template,
            max_length=max_length,
            over_length=over_length,
            label_pad=label_pad,
            template_kwargs=template_kwargs,
            add_special_tokens=add_special_tokens,
            stats=self.stats,
        )
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    # The encoder's settings, read through (one source of truth: the encoder).
    tokenizer = property(lambda self: self.encoder.tokenizer)
    template = property(lambda self: self.encoder.template)
    max_length = property(lambda self: self.encoder.max_length)
    over_length = property(lambda self: self.encoder.over_length)
    label_pad = property(lambda self: self.encoder.label_pad)
    pad_token_id = property(lambda self: self.encoder.pad_token_id)
    image_seq_length = property(lambda self: self.encoder.image_seq_length)

    def encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The encoder's :meth:`~internvl_chat.data.encoding.SampleEncoder.encode` (no length policy)."""
        return self.encoder.encode(sample)

    # ------------------------------------------------------------------------------------------- batching
    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        encoded, images = [], []
        for sample in samples:
            enc = self.encoder.fit(sample, self.encoder.encode(sample))
            if enc is None:
                continue
            encoded.append(enc)
            images_of_sample = sample_images(sample)
            if any(not isinstance(im, Image.Image) for im in images_of_sample):
                # Paths / bytes (HF-dataset route): opened here, in the DataLoader worker; errors name the sample.
                images_of_sample = load_sample_images({**sample, "images": images_of_sample})
            images.extend(images_of_sample)
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

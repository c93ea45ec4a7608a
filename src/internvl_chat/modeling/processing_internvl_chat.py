"""Processor of the InternVL-Chat / LLaVA family: image processor + tokenizer + chat template.

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")

Every `<image>` in the text becomes `image_seq_length` copies of the image token (a real token of the tokenizer),
so the model's image-feature count and the sequence line up. Counts are checked here, per sample, with both numbers
in the error; truncation that would cut image tokens is refused. Part of the Hub unit (imports only transformers).
"""

from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import MultiModalData
from transformers.utils import logging

from .image_processing_internvl_chat import PREPROCESS_OPTIONS

logger = logging.get_logger(__name__)

# The image placeholder of every template and dataset of the LLaVA family (a real token of the tokenizer).
IMAGE_TOKEN = "<image>"


# Chat templates saved by earlier versions of this package put the separator space after `ASSISTANT:` / `[/INST]`
# outside `{% generation %}`; with the start-inside rule its `▁Blue` token would fall out of the answer. The
# rendered text is the same either way, so such a saved template is upgraded when loaded.
_SEPARATOR_OUTSIDE_SPAN = {
    "{{- 'ASSISTANT: ' -}}\n{%- generation -%}\n{{- turn(": (
        "{{- 'ASSISTANT:' -}}\n{%- generation -%}\n{{- ' ' ~ turn("
    ),
    "{{- ' ' -}}\n{%- generation -%}\n{{- turn(": "{%- generation -%}\n{{- ' ' ~ turn(",
}


def upgrade_chat_template(source):
    """`source` with the separator space moved into the answer span (same text); other templates unchanged."""
    if isinstance(source, str):
        for old, new in _SEPARATOR_OUTSIDE_SPAN.items():
            source = source.replace(old, new)
    return source


def tokenize_llava(tokenizer, text, image_token, image_token_id, image_seq_length, add_special_tokens=None):
    """LLaVA's `tokenizer_image_token`, with character offsets: the one piecewise tokenization of the package.

    The text is cut at each `image_token`, every piece is tokenized on its own (the first one with the tokenizer's
    special tokens, i.e. BOS) and `image_seq_length` copies of `image_token_id` are put between the pieces.
    `add_special_tokens=None` adds BOS unless the text already starts with the BOS token (templates such as llama3
    write it; transformers' `apply_chat_template` follows the same rule).

    Returns `(ids, offsets, image_positions)`: `offsets[i]` is the (start, end) character range of token i in
    `text` (an image id gets the range of its placeholder, BOS an empty range), `image_positions` the indices of the
    image ids.

    # [IMPORTANT] tokenizing the whole string with `<image>` as a special token is NOT the same: SentencePiece
    # tokenizers give the text after a separately-tokenized piece a leading "▁" (`<image>` then "\n" is
    # ids 29871, 13 for Llama-2), which is what every LLaVA / InternVL-Chat / ShareGPT4V model was trained on.
    """
    if add_special_tokens is None:
        bos = tokenizer.bos_token
        add_special_tokens = not (bos is not None and text.startswith(bos))
    ids, offsets, image_positions = [], [], []
    start, placeholder = 0, len(image_token) if image_token else 0
    # image_token=None: no placeholder to cut out (text-only use), one tokenizer call.
    for j, piece in enumerate(text.split(image_token) if image_token else [text]):
        if j > 0:
            image_positions.extend(range(len(ids), len(ids) + image_seq_length))
            ids.extend([image_token_id] * image_seq_length)
            offsets.extend([(start - placeholder, start)] * image_seq_length)
        special = add_special_tokens and j == 0
        # An empty piece is tokenized only when it carries BOS (LLaVA tokenizes every chunk, but an empty chunk
        # without special tokens has no ids).
        if piece or special:
            encoding = tokenizer(piece, add_special_tokens=special, return_offsets_mapping=True)
            ids.extend(encoding["input_ids"])
            # Special tokens added by the tokenizer (BOS) have empty (0, 0) offsets: keep them empty after the shift.
            offsets.extend(
                (int(a) + start, int(b) + start) if b > a else (start, start) for a, b in encoding["offset_mapping"]
            )
        start += len(piece) + placeholder
    return ids, offsets, image_positions


def supervised_token_mask(text, offsets, spans, image_positions=()):
    """1 for each token that starts inside a supervised character span (`{% generation %}` of the template).

    The rule of the original LLaVA / LLaVA-pp label arithmetic: a token belongs to the answer when it *starts*
    inside the answer. A token that begins in the prompt and swallows the answer's leading whitespace (phi3's
    `<|assistant|>` eating a following space or newline, llama3's `ĊĊĊ` merging the header's `\n\n` with an
    answer's `\n`) stays a prompt token. The separator space after `ASSISTANT:` / `[/INST]` lies inside the span in
    our templates, so its `▁` (alone before a digit, or in `▁Blue`) is supervised as LLaVA's `-2` arithmetic does.
    Image positions and empty tokens (BOS) are never supervised.

    With `text` given, raises `ValueError` when a non-whitespace character of a span is not covered by a supervised
    token (a token straddling the span start, or a tokenizer whose offsets do not cover the text); `text=None` skips
    that check.
    """
    mask = [0] * len(offsets)
    images = set(image_positions)
    for span_start, span_end in spans:
        if span_end <= span_start:
            continue
        covered = [False] * (span_end - span_start)
        for i, (tok_start, tok_end) in enumerate(offsets):
            if tok_end > tok_start and span_start <= tok_start < span_end:
                # An image placeholder inside an answer is an input, never a target, but its text is accounted for.
                mask[i] = 0 if i in images else 1
                for pos in range(tok_start, min(tok_end, span_end)):
                    covered[pos - span_start] = True
        missing = [
            p for p, ok in enumerate(covered) if not ok and (text is None or not text[span_start + p].isspace())
        ]
        if missing and text is not None:
            where = span_start + missing[0]
            raise ValueError(
                f"Cannot map the supervised span {text[span_start:span_end]!r} (characters {span_start}:{span_end}) "
                f"to tokens: character {where} ({text[where]!r}) is in no token that starts inside the span. "
                "Either a token straddles the start of the answer or the tokenizer's offsets do not cover the text "
                "(is it a fast tokenizer?)."
            )
    return mask


# Tokenizer call options the processor forwards; the rest of what `apply_chat_template` or pipelines pass along
# (`return_dict`, `tokenize`, multimodal flags of other models) is not a tokenizer option.
TOKENIZER_KWARGS = (
    "padding",
    "truncation",
    "max_length",
    "add_special_tokens",
    "return_attention_mask",
    "padding_side",
    "pad_to_multiple_of",
    "return_offsets_mapping",
)


class InternVLChatProcessor(ProcessorMixin):
    """Wraps an `InternVLChatImageProcessor` and a tokenizer (with `<image>` as a real token)."""

    # The sub-processors come from `__init__`'s argument names and load through AutoImageProcessor / AutoTokenizer
    # (transformers >= 5.17 infers both; naming them as `*_class` attributes is deprecated and warns on every load).

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = IMAGE_TOKEN,
        image_seq_length: int = 576,
        stop_strings=None,
        **kwargs,
    ):
        self.image_token = image_token
        self.image_seq_length = image_seq_length
        self.stop_strings = list(stop_strings or [])
        if tokenizer is not None:
            token_id = tokenizer.convert_tokens_to_ids(image_token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"The tokenizer has no {image_token!r} token: add it as a special token "
                    f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})) and resize "
                    "the model's embeddings."
                )
            self.image_token_id = token_id
        super().__init__(image_processor, tokenizer, chat_template=upgrade_chat_template(chat_template))

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs) -> BatchFeature:
        """Tokenizes `text` (str or list) with `<image>` expanded and preprocesses `images`.

        `images`: one image, a flat list (consumed in order of the `<image>` placeholders over the whole batch), or
        a list with one list of images per text. Returns `input_ids`, `attention_mask` and, when images are given,
        `pixel_values` of shape (num_images, 3, S, S).
        """
        if text is None:
            raise ValueError("The processor needs `text` holding one `<image>` placeholder per image.")
        texts = [text] if isinstance(text, str) else list(text)
        images_kwargs = {**kwargs.pop("images_kwargs", {})}
        text_kwargs = {**kwargs.pop("text_kwargs", {})}
        for key in list(kwargs):
            if key in PREPROCESS_OPTIONS:
                images_kwargs[key] = kwargs.pop(key)
            elif key in TOKENIZER_KWARGS:
                text_kwargs[key] = kwargs.pop(key)
        if kwargs:
            logger.debug("InternVLChatProcessor ignores %s", sorted(kwargs))

        per_sample = self._images_per_sample(images, texts)
        if per_sample_given(images, texts):
            self._check_placeholders(texts, [len(sample_images) for sample_images in per_sample])
        flat_images = [image for sample_images in per_sample for image in sample_images]
        expected = sum(t.count(self.image_token) for t in texts)
        if len(flat_images) != expected:
            raise ValueError(
                f"The text holds {expected} `{self.image_token}` placeholders but {len(flat_images)} images were "
                "given; each image needs exactly one placeholder."
            )

        data = dict(self.encode_text(texts, **text_kwargs))
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors="pt", **images_kwargs)[
                "pixel_values"
            ]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_text(self, texts, num_images=None, **text_kwargs):
        """The text half of `__call__`: `texts` tokenized with every `<image>` expanded, for callers that preprocess
        the images themselves (the eval runner does it per image, in threads). `num_images[i]`, when given, is the
        number of images sample i comes with; its placeholders must match. Text kwargs as `__call__`'s."""
        if num_images is not None:
            self._check_placeholders(texts, num_images)
        encoding = self._tokenize(texts, **text_kwargs)
        # Truncation must never cut inside the image tokens: the model would see fewer tokens than features.
        for i, (text, ids) in enumerate(zip(texts, encoding["input_ids"])):
            n_images = text.count(self.image_token)
            kept = sum(1 for t in ids if t == self.image_token_id)
            want = n_images * self.image_seq_length
            if kept != want:
                raise ValueError(
                    f"Sample {i}: {want} image tokens expected ({n_images} images × {self.image_seq_length}) but "
                    f"{kept} remain after tokenization (max_length={text_kwargs.get('max_length')}); truncation "
                    "would cut the image tokens. Raise max_length or shorten the text."
                )
        return encoding

    def _check_placeholders(self, texts, num_images):
        for i, (text, n) in enumerate(zip(texts, num_images)):
            n_tokens = text.count(self.image_token)
            if n_tokens != n:
                raise ValueError(
                    f"Sample {i}: {n_tokens} `{self.image_token}` placeholders in the text but {n} images."
                )

    def _tokenize(
        self,
        texts,
        add_special_tokens=None,
        truncation=False,
        max_length=None,
        padding=False,
        return_offsets_mapping=False,
        **kwargs,
    ):
        """Tokenizes each text with `tokenize_llava` (LLaVA's piecewise rule around `<image>`), truncates, pads.

        `return_offsets_mapping=True` adds `offset_mapping`: per token its (start, end) characters in the text
        (image ids: their placeholder's range; BOS and padding: empty ranges), as transformers'
        `apply_chat_template(..., return_assistant_tokens_mask=True)` needs."""
        rows, row_offsets = [], []
        for text in texts:
            ids, offsets, _ = tokenize_llava(
                self.tokenizer, text, self.image_token, self.image_token_id, self.image_seq_length, add_special_tokens
            )
            if truncation and max_length is not None and len(ids) > max_length:
                keep = (
                    slice(None, max_length) if self.tokenizer.truncation_side == "right" else slice(-max_length, None)
                )
                ids, offsets = ids[keep], offsets[keep]
            rows.append(ids)
            row_offsets.append(offsets)
        pad_kwargs = {
            k: kwargs[k] for k in ("pad_to_multiple_of", "padding_side", "return_attention_mask") if k in kwargs
        }
        encoding = self.tokenizer.pad({"input_ids": rows}, padding=padding, max_length=max_length, **pad_kwargs)
        if return_offsets_mapping:
            side = kwargs.get("padding_side") or self.tokenizer.padding_side
            padded = []
            for ids, offsets in zip(encoding["input_ids"], row_offsets):
                fill = [(0, 0)] * (len(ids) - len(offsets))
                padded.append(fill + offsets if side == "left" else offsets + fill)
            encoding["offset_mapping"] = padded
        return encoding

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' `apply_chat_template`, with the template's BOS rule always applied when tokenizing.

        # [IMPORTANT] the checkpoints were trained with the tokenizer's BOS in front of every sample unless the
        # template writes it (llama3): TRL's collators pass `add_special_tokens=False` in `processor_kwargs` to
        # avoid a double BOS, which for our BOS-less templates (vicuna_v1, phi3_instruct...) would drop it. Here
        # BOS is added exactly when the rendered text does not start with it (`tokenize_llava`'s rule).
        """
        processor_kwargs = kwargs.get("processor_kwargs")
        if isinstance(processor_kwargs, dict) and processor_kwargs.get("add_special_tokens") is False:
            kwargs["processor_kwargs"] = {k: v for k, v in processor_kwargs.items() if k != "add_special_tokens"}
        if kwargs.get("add_special_tokens") is False:
            kwargs.pop("add_special_tokens")
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _adjust_assistant_masks_indices(self, processed_dict, generation_indices):
        """`apply_chat_template(..., return_assistant_tokens_mask=True)`: assistant masks by our supervision rule.

        # [IMPORTANT] transformers' own rule (>= 5.18) marks every token that *overlaps* a `{% generation %}` span;
        # ours (`supervised_token_mask`) marks those that *start* in it, as the original label arithmetic and our
        # training collator do, so a TRL `assistant_only_loss=True` run trains on exactly the same tokens. Our
        # offsets are already in the coordinates of the rendered text (no placeholder shift to undo).
        # Version note: transformers >= 5.18 routes the masks through this method; 5.17 computes them inline with
        # its own rule (TRL refuses assistant-only loss on vision data below 5.18). Nothing to delete until then.
        """
        offset_mapping = processed_dict.pop("offset_mapping")
        processed_dict.pop("text_replacement_offsets", None)
        input_ids = processed_dict["input_ids"]
        masks = []
        for i in range(len(input_ids)):
            ids = input_ids[i].tolist() if hasattr(input_ids[i], "tolist") else list(input_ids[i])
            offsets = offset_mapping[i].tolist() if hasattr(offset_mapping[i], "tolist") else offset_mapping[i]
            offsets = [(int(a), int(b)) for a, b in offsets]
            images = [j for j, t in enumerate(ids) if t == self.image_token_id]
            masks.append(supervised_token_mask(None, offsets, generation_indices[i], images))
        processed_dict["assistant_masks"] = masks
        return processed_dict

    def _images_per_sample(self, images, texts):
        if images is None:
            return [[] for _ in texts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if per_sample_given(images, texts):
            return [list(sample) if isinstance(sample, (list, tuple)) else [sample] for sample in images]
        # A flat list: hand the images out in placeholder order.
        out, start = [], 0
        for t in texts:
            n = t.count(self.image_token)
            out.append(list(images[start : start + n]))
            start += n
        if start != len(images):
            out[-1].extend(images[start:])
        return out

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decodes generated ids and cuts each answer at the template's first stop string (`</s>`, `<|end|>`...)."""
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        out = []
        for t in texts:
            for stop in self.stop_strings:
                if stop in t:
                    t = t[: t.index(stop)]
            out.append(t.strip())
        return out

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder tokens per image for images of the given (height, width) sizes, as transformers' serving
        code and vLLM's transformers backend ask every processor (`LlavaProcessor` has the same method).

        Every image becomes one fixed-size input (padded or resized to the square input, whatever its size), so
        each one takes `image_seq_length` tokens and one patch. Returns a `MultiModalData` with `num_image_tokens`
        and `num_image_patches` (one entry per size); empty when `image_sizes` is None.
        """
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.image_seq_length] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def per_sample_given(images, texts) -> bool:
    """True when `images` is a list holding one list of images per text (the batched chat-template form)."""
    return (
        isinstance(images, (list, tuple))
        and len(images) == len(texts)
        and all(isinstance(sample, (list, tuple)) for sample in images)
    )

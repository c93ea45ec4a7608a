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
from transformers.utils import logging

from .image_processing_internvl_chat import PREPROCESS_OPTIONS

logger = logging.get_logger(__name__)

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
        image_token: str = "<image>",
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
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

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

    def _tokenize(self, texts, add_special_tokens=None, truncation=False, max_length=None, padding=False, **kwargs):
        """Tokenizes as LLaVA's `tokenizer_image_token`: the text is cut at each `<image>`, every piece is
        tokenized on its own (the first with special tokens, i.e. BOS) and `image_seq_length` image-token ids
        are put between the pieces. `add_special_tokens=None` adds them unless the text already starts with the BOS
        token (templates such as llama3 write it; transformers' `apply_chat_template` follows the same rule).

        # [IMPORTANT] tokenizing the whole string with `<image>` as a special token is NOT the same: SentencePiece
        # tokenizers give the text after a separately-tokenized piece a leading "▁" (`<image>` then "\n" is
        # ids 29871, 13 for Llama-2), which is what every LLaVA / InternVL-Chat / ShareGPT4V model was trained on.
        """
        rows = []
        bos = self.tokenizer.bos_token
        for text in texts:
            add = add_special_tokens if add_special_tokens is not None else not (bos and text.startswith(bos))
            pieces = text.split(self.image_token)
            ids = []
            for j, piece in enumerate(pieces):
                if j > 0:
                    ids.extend([self.image_token_id] * self.image_seq_length)
                special = add and j == 0
                if piece or special:
                    ids.extend(self.tokenizer(piece, add_special_tokens=special)["input_ids"])
            if truncation and max_length is not None and len(ids) > max_length:
                ids = ids[:max_length] if self.tokenizer.truncation_side == "right" else ids[-max_length:]
            rows.append(ids)
        pad_kwargs = {
            k: kwargs[k] for k in ("pad_to_multiple_of", "padding_side", "return_attention_mask") if k in kwargs
        }
        return self.tokenizer.pad({"input_ids": rows}, padding=padding, max_length=max_length, **pad_kwargs)

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

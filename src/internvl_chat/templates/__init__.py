"""Conversation templates of the LLaVA family as Hugging Face jinja chat templates.

Each template lives in ``<name>.jinja`` next to this module (shipped as package data) and renders, byte for byte,
the text that LLaVA's / LLaVA-pp's ``Conversation.get_prompt()`` produced for training, from ordinary HF message
lists::

    [{"role": "system", "content": "..."},                      # optional, replaces the default system prompt
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
     {"role": "assistant", "content": "A cat."}]

Shared rules (all templates):

* An image block, or a literal ``<image>`` in the text, is moved to the start of its turn: LLaVA removes the
  ``<image>`` occurrences, strips the text and writes ``<image>\\n`` + text (one ``<image>\\n`` per image; an
  image-only turn is just ``<image>``). ``v1_mmtag`` writes ``<Image><image></Image>`` instead. Turns without an
  image are left verbatim. Text blocks of a list content are concatenated without separator.
* The supervised part of every assistant turn (answer + turn terminator, e.g. ``A cat.</s>``) is wrapped in
  ``{% generation %}`` so that ``render_jinja_template(..., return_assistant_tokens_mask=True)`` (transformers
  5.17 and 5.23) returns its character span; :func:`encode_chat` turns those spans into a token mask.
* BOS: only ``llama3`` (``<|begin_of_text|>``) and ``llava_llama_2`` (``</s><s>`` between rounds) write BOS text.
  The others rely on the tokenizer; :func:`encode_chat` adds special tokens unless the rendered text already
  starts with ``tokenizer.bos_token`` (the rule of transformers' ``ProcessorMixin.apply_chat_template``).
  ``llama3`` takes the template variable ``double_bos=True`` to write ``<|begin_of_text|>`` twice, reproducing
  the double BOS the original LLaVA-pp / LLaVAR-2 training saw (*unverified*).
* ``add_generation_prompt`` appends what ``get_prompt()`` appends for an empty assistant message: ``ASSISTANT:``
  (vicuna family, no trailing space), ``<|im_start|>assistant\\n``, ``\\n<|assistant|>\\n``,
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``, and nothing for ``llava_llama_2`` /
  ``mistral_instruct`` (the user turn already ends with ``[/INST]``) and ``plain`` (the captioning prompt is the
  bare ``<image>``).
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

__all__ = [
    "ALIASES",
    "TEMPLATES",
    "TemplateSpec",
    "encode_chat",
    "get_template",
    "get_template_spec",
    "render_chat",
    "resolve_template_name",
]


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """Registry entry of one conversation template."""

    name: str
    file: str
    stop_strings: tuple[str, ...]
    default_system: str
    description: str


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, TemplateSpec] = {
    spec.name: spec
    for spec in (
        TemplateSpec(
            name="plain",
            file="plain.jinja",
            stop_strings=("\n",),
            default_system="",
            description="Stage-1 alignment captions: '<image>' + caption + '\\n'; no system, no roles.",
        ),
        TemplateSpec(
            name="vicuna_v1",
            file="vicuna_v1.jinja",
            stop_strings=("</s>",),
            default_system=_VICUNA_SYSTEM,
            description="LLaVA-1.5 / InternVL-Chat / ShareGPT4V finetune template (Vicuna-v1.5), alias 'v1'.",
        ),
        TemplateSpec(
            name="llava_v1",
            file="llava_v1.jinja",
            stop_strings=("</s>",),
            default_system=(
                "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions."
            ),
            description="vicuna_v1 layout with the 'curious human' system prompt.",
        ),
        TemplateSpec(
            name="v1_mmtag",
            file="v1_mmtag.jinja",
            stop_strings=("</s>",),
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. "
                "The assistant is able to understand the visual content that the user provides, and assist the "
                "user with a variety of tasks using natural language."
                "The visual content will be provided with the following format: <Image>visual content</Image>."
            ),
            description="vicuna_v1 layout, mmtag system prompt, images written '<Image><image></Image>'.",
        ),
        TemplateSpec(
            name="llava_llama_2",
            file="llava_llama_2.jinja",
            stop_strings=("</s>",),
            default_system=(
                "You are a helpful language and vision assistant. You are able to understand the visual content "
                "that the user provides, and assist the user with a variety of tasks using natural language."
            ),
            description="Llama-2-chat [INST] <<SYS>> layout with '</s><s>' between rounds.",
        ),
        TemplateSpec(
            name="mistral_instruct",
            file="mistral_instruct.jinja",
            stop_strings=("</s>",),
            default_system="",
            description="Mistral-Instruct [INST] layout, no system prompt, no '<s>' between rounds.",
        ),
        TemplateSpec(
            name="chatml_direct",
            file="chatml_direct.jinja",
            stop_strings=("<|im_end|>",),
            default_system="Answer the questions.",
            description="ChatML without newlines after '<|im_end|>' (LLaVA-1.6 chatml_direct).",
        ),
        TemplateSpec(
            name="phi3_instruct",
            file="phi3_instruct.jinja",
            stop_strings=("<|end|>",),
            default_system="You are a helpful AI assistant.",
            description="Phi-3 instruct layout of LLaVA-pp / LLaVAR-2 (Phi-3.5-mini).",
        ),
        TemplateSpec(
            name="llama3",
            file="llama3.jinja",
            stop_strings=("<|eot_id|>",),
            default_system=_VICUNA_SYSTEM,
            description=(
                "Llama-3 header layout of LLaVA-pp / LLaVAR-2 (Llama-3.1-8B); writes '<|begin_of_text|>', "
                "template variable double_bos=True writes it twice like the original training."
            ),
        ),
    )
}

ALIASES: dict[str, str] = {"v1": "vicuna_v1", "mistral_direct": "chatml_direct"}


def _valid_names() -> str:
    return ", ".join(sorted([*TEMPLATES, *ALIASES]))


def resolve_template_name(name: str) -> str:
    """Canonical template name for ``name`` (aliases resolved); ``ValueError`` for unknown names."""
    canonical = ALIASES.get(name, name)
    if canonical not in TEMPLATES:
        raise ValueError(f"Unknown conversation template {name!r}; valid templates: {_valid_names()}")
    return canonical


def get_template_spec(name: str) -> TemplateSpec:
    """The :class:`TemplateSpec` of ``name`` (aliases allowed)."""
    return TEMPLATES[resolve_template_name(name)]


def get_template(name: str) -> str:
    """The jinja source of template ``name`` (aliases allowed), e.g. to store as a processor's chat_template."""
    spec = get_template_spec(name)
    return resources.files(__name__).joinpath(spec.file).read_text(encoding="utf-8")


def _template_source(template: str) -> str:
    # A registered name, or a jinja source (anything containing a jinja tag) used as is.
    if "{%" in template or "{{" in template:
        return template
    return get_template(template)


def _render(
    messages: list[dict[str, Any]], template: str, add_generation_prompt: bool, template_kwargs: dict[str, Any]
) -> tuple[str, list[tuple[int, int]]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, generation_indices = render_jinja_template(
        conversations=[messages],
        chat_template=_template_source(template),
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
    return rendered[0], [(int(start), int(end)) for start, end in generation_indices[0]]


def render_chat(
    messages: list[dict[str, Any]], template: str, add_generation_prompt: bool = False, **template_kwargs: Any
) -> str:
    """Render ``messages`` with template ``template`` (a registered name or a jinja source) to a string.

    Extra keyword arguments are template variables (e.g. ``double_bos=True`` for ``llama3``).
    """
    return _render(messages, template, add_generation_prompt, template_kwargs)[0]


def _spans_to_mask(text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token mask: 1 for every token whose character range overlaps a generation span.

    A token that only partly lies in a span (SentencePiece's '▁A' carrying the separator space before an answer,
    a special token with ``rstrip`` swallowing the following newline) must still be predicted to produce the
    answer, so it is supervised. Raises ``ValueError`` when a non-whitespace character of a span is covered by no
    token, or when a non-empty span gets no token at all.
    """
    mask = [0] * len(offsets)
    for start, end in spans:
        if end <= start:
            continue
        covered = [False] * (end - start)
        hit = False
        for index, (tok_start, tok_end) in enumerate(offsets):
            if tok_end <= tok_start or tok_end <= start or tok_start >= end:
                continue
            mask[index] = 1
            hit = True
            for pos in range(max(tok_start, start), min(tok_end, end)):
                covered[pos - start] = True
        # [IMPORTANT] a lone separator-space token right before the span is part of the answer too: Llama-2's
        # SentencePiece writes "ASSISTANT: 7" as ":", "▁", "7" (a digit never merges with "▁"), and LLaVA's
        # `instruction_len - 2` rule supervises that "▁". Left out, a model never learns to start an answer
        # with a digit.
        first = next((i for i, m in enumerate(mask) if m and offsets[i][1] > start), None)
        if first is not None and first > 0:
            tok_start, tok_end = offsets[first - 1]
            if tok_start < tok_end == offsets[first][0] <= start and text[tok_start:tok_end] == " ":
                mask[first - 1] = 1
        missing = [start + i for i, ok in enumerate(covered) if not ok and not text[start + i].isspace()]
        if not hit or missing:
            where = missing[0] if missing else start
            raise ValueError(
                f"Cannot map the supervised span {text[start:end]!r} (characters {start}:{end}) to tokens: "
                f"{'no token overlaps it' if not hit else f'character {where} ({text[where]!r}) has no token'}. "
                "The tokenizer's offsets do not cover the rendered text (is it a fast tokenizer?)."
            )
    return mask


def _tokenize_with_offsets(
    tokenizer: Any, text: str, add_special_tokens: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [(int(a), int(b)) for a, b in encoding["offset_mapping"]]


def _tokenize_piecewise(
    tokenizer: Any, text: str, add_special_tokens: bool, image_token: str, image_token_id: int, image_seq_length: int
) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """LLaVA's ``tokenizer_image_token`` with character offsets into the full ``text``.

    Mirrors ``InternVLChatProcessor._tokenize`` exactly: the text is cut at each ``image_token``, every piece is
    tokenized on its own (the first one with special tokens), and ``image_seq_length`` copies of ``image_token_id``
    are put between the pieces. Offsets of a piece are shifted by the piece's start; the image ids get the
    character range of their placeholder (so a placeholder inside a supervised span counts as covered) and are
    returned in ``image_positions`` so the caller can exclude them from the labels.
    """
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    image_positions: list[int] = []
    start = 0
    for j, piece in enumerate(text.split(image_token)):
        if j > 0:
            image_start = start - len(image_token)
            image_positions.extend(range(len(ids), len(ids) + image_seq_length))
            ids.extend([image_token_id] * image_seq_length)
            offsets.extend([(image_start, start)] * image_seq_length)
        special = add_special_tokens and j == 0
        # [IMPORTANT] same condition as the processor: an empty piece is tokenized only when it carries BOS.
        if piece or special:
            piece_ids, piece_offsets = _tokenize_with_offsets(tokenizer, piece, special)
            ids.extend(piece_ids)
            # Special tokens added by the tokenizer (BOS) have empty (0, 0) offsets: keep them empty after the shift.
            offsets.extend((a + start, b + start) if b > a else (start, start) for a, b in piece_offsets)
        start += len(piece) + len(image_token)
    return ids, offsets, image_positions


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    add_generation_prompt: bool = False,
    add_special_tokens: bool | None = None,
    image_token: str | None = None,
    image_seq_length: int = 1,
    image_token_id: int | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """Render and tokenize a conversation, with the assistant mask taken from the template's generation spans.

    Args:
        tokenizer: a *fast* tokenizer (offsets are needed).
        messages: HF message list.
        template: registered template name (or alias), or a jinja source.
        add_generation_prompt: append the assistant prefix (inference).
        add_special_tokens: ``None`` (default) adds the tokenizer's special tokens (BOS) unless the rendered text
            already starts with ``tokenizer.bos_token`` (transformers' processor rule); ``True``/``False`` force it.
        image_token: when given (e.g. ``"<image>"``), tokenize LLaVA-style like ``InternVLChatProcessor``: the
            text is cut at each ``image_token``, each piece is tokenized separately (the first with special
            tokens) and ``image_seq_length`` copies of ``image_token_id`` (default: the tokenizer's id of
            ``image_token``) are inserted. The ids then equal the processor's ids for the same text, which is what
            the model sees at inference; image positions are never in the mask. ``None`` (default) tokenizes the
            whole text in one call (text-only use, ``test_templates``).
        image_seq_length: image-token ids per placeholder (576 for CLIP-L/336, ``processor.image_seq_length``).
        image_token_id: id of the image token (default: looked up in the tokenizer).
        **template_kwargs: template variables (e.g. ``double_bos=True`` for ``llama3``).

    Returns:
        ``{"input_ids": list[int], "assistant_masks": list[int], "text": str, "image_positions": list[int]}``;
        ``assistant_masks[i] == 1`` for the supervised tokens (each answer and its terminator). Labels are
        ``input_ids`` where the mask is 1, else -100. Raises ``ValueError`` if a supervised span cannot be mapped to
        tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"encode_chat needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    text, spans = _render(messages, template, add_generation_prompt, template_kwargs)
    if add_special_tokens is None:
        bos = tokenizer.bos_token
        add_special_tokens = not (bos is not None and text.startswith(bos))
    image_positions: list[int] = []
    if image_token is None:
        input_ids, offsets = _tokenize_with_offsets(tokenizer, text, add_special_tokens)
    else:
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            if image_token_id is None or image_token_id == tokenizer.unk_token_id:
                raise ValueError(f"The tokenizer has no {image_token!r} token; pass image_token_id or add it.")
        input_ids, offsets, image_positions = _tokenize_piecewise(
            tokenizer, text, add_special_tokens, image_token, int(image_token_id), int(image_seq_length)
        )
    mask = _spans_to_mask(text, offsets, spans)
    for position in image_positions:
        mask[position] = 0  # image features are inputs, never targets
    return {"input_ids": input_ids, "assistant_masks": mask, "text": text, "image_positions": image_positions}

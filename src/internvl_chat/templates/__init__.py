"""Conversation templates of the LLaVA family as Hugging Face jinja chat templates, and ``encode_chat``.

Each template is ``<name>.jinja`` next to this module (package data) composed with the shared helpers of
``_helpers.jinja`` (:func:`get_template` returns the composed source, which processors save as
``chat_template.jinja``). It renders, byte for byte, the text that LLaVA's / LLaVA-pp's ``Conversation.get_prompt()``
produced for training, from ordinary HF message lists::

    [{"role": "system", "content": "..."},                      # optional, replaces the default system prompt
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
     {"role": "assistant", "content": "A cat."}]

Shared rules (all templates):

* An image block, or a literal ``<image>`` in the text, is moved to the start of its turn: LLaVA removes the
  ``<image>`` occurrences, strips the text and writes ``<image>\\n`` + text (one ``<image>\\n`` per image; an
  image-only turn is just ``<image>``). ``v1_mmtag`` writes ``<Image><image></Image>`` instead. Turns without an
  image are left verbatim. Text blocks of a list content are concatenated without separator.
* A first turn from the assistant (after an optional system message) is dropped, as every original
  ``preprocess_*`` does; :func:`drops_leading_assistant` tells whether a conversation has one (data checks and
  training summaries count them).
* The supervised part of every assistant turn (answer + turn terminator, e.g. ``A cat.</s>``; for the vicuna and
  ``[INST]`` families also the separator space before the answer) is wrapped in ``{% generation %}``; a token is
  supervised when it *starts* inside that span (``supervised_token_mask`` of the processor module, the rule of the
  original label arithmetic). :func:`encode_chat` builds the mask; the processor's
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the same mask (TRL ``assistant_only_loss``).
* BOS: only ``llama3`` (``<|begin_of_text|>``) and ``llava_llama_2`` (``</s><s>`` between rounds) write BOS text.
  The others rely on the tokenizer: BOS is added unless the rendered text already starts with
  ``tokenizer.bos_token`` (the rule of transformers' ``ProcessorMixin.apply_chat_template``).
  ``llama3`` takes the template variable ``double_bos`` (default false): true writes ``<|begin_of_text|>`` twice,
  the ``[128000, 128000, ...]`` input LLaVA-pp's llama3 preprocessing produced (its system prompt holds the BOS
  text and the tokenizer adds another), which the LLaVAR-2 Llama-3.1 checkpoints were trained on; their preset
  turns it on.
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

from ..modeling.processing_internvl_chat import supervised_token_mask, tokenize_llava, upgrade_chat_template

__all__ = [
    "ALIASES",
    "TEMPLATES",
    "TemplateSpec",
    "drops_leading_assistant",
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
    description: str


TEMPLATES: dict[str, TemplateSpec] = {
    spec.name: spec
    for spec in (
        TemplateSpec(
            name="plain",
            file="plain.jinja",
            stop_strings=("\n",),
            description="Stage-1 alignment captions: '<image>' + caption + '\\n'; no system, no roles.",
        ),
        TemplateSpec(
            name="vicuna_v1",
            file="vicuna_v1.jinja",
            stop_strings=("</s>",),
            description="LLaVA-1.5 / InternVL-Chat / ShareGPT4V finetune template (Vicuna-v1.5), alias 'v1'.",
        ),
        TemplateSpec(
            name="llava_v1",
            file="llava_v1.jinja",
            stop_strings=("</s>",),
            description="vicuna_v1 layout with the 'curious human' system prompt.",
        ),
        TemplateSpec(
            name="v1_mmtag",
            file="v1_mmtag.jinja",
            stop_strings=("</s>",),
            description="vicuna_v1 layout, mmtag system prompt, images written '<Image><image></Image>'.",
        ),
        TemplateSpec(
            name="llava_llama_2",
            file="llava_llama_2.jinja",
            stop_strings=("</s>",),
            description="Llama-2-chat [INST] <<SYS>> layout with '</s><s>' between rounds.",
        ),
        TemplateSpec(
            name="mistral_instruct",
            file="mistral_instruct.jinja",
            stop_strings=("</s>",),
            description="Mistral-Instruct [INST] layout, no system prompt, no '<s>' between rounds.",
        ),
        TemplateSpec(
            name="chatml_direct",
            file="chatml_direct.jinja",
            stop_strings=("<|im_end|>",),
            description="ChatML without newlines after '<|im_end|>' (LLaVA-1.6 chatml_direct).",
        ),
        TemplateSpec(
            name="phi3_instruct",
            file="phi3_instruct.jinja",
            stop_strings=("<|end|>",),
            description="Phi-3 instruct layout of LLaVA-pp / LLaVAR-2 (Phi-3.5-mini).",
        ),
        TemplateSpec(
            name="llama3",
            file="llama3.jinja",
            stop_strings=("<|eot_id|>",),
            description=(
                "Llama-3 header layout of LLaVA-pp / LLaVAR-2 (Llama-3.1-8B); writes '<|begin_of_text|>' twice, as "
                "the LLaVAR-2 checkpoints were trained; template variable double_bos=False writes it once."
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


HELPERS_FILE = "_helpers.jinja"
# The line of every template file where the shared helpers are composed in.
HELPERS_PLACEHOLDER = "{#- @helpers: templates/_helpers.jinja is composed here -#}\n"


def get_template(name: str) -> str:
    """The jinja source of template ``name`` (aliases allowed), e.g. to store as a processor's chat_template: the
    template file with the shared helpers (``_helpers.jinja``) composed in."""
    spec = get_template_spec(name)
    files = resources.files(__name__)
    source = files.joinpath(spec.file).read_text(encoding="utf-8")
    if HELPERS_PLACEHOLDER not in source:
        raise ValueError(f"Template file {spec.file} lacks the helpers placeholder line {HELPERS_PLACEHOLDER!r}")
    return source.replace(HELPERS_PLACEHOLDER, files.joinpath(HELPERS_FILE).read_text(encoding="utf-8"), 1)


def drops_leading_assistant(messages: list[dict[str, Any]]) -> bool:
    """True when the conversation's first turn (after an optional system message) comes from the assistant: every
    template drops that turn, as the original LLaVA / LLaVA-pp preprocessing does. For data checks and training
    summaries, which count (and name) such samples."""
    turns = messages[1:] if messages and messages[0].get("role") == "system" else messages
    return bool(turns) and turns[0].get("role") == "assistant"


def _template_source(template: str) -> str:
    # A registered name, or a jinja source (anything containing a jinja tag) used as is.
    if "{%" in template or "{{" in template:
        return upgrade_chat_template(template)
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

    Extra keyword arguments are template variables (e.g. ``double_bos=False`` for a single-BOS ``llama3``).
    """
    return _render(messages, template, add_generation_prompt, template_kwargs)[0]


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
        **template_kwargs: template variables (e.g. ``double_bos=False`` for a single-BOS ``llama3``).

    Returns:
        ``{"input_ids": list[int], "assistant_masks": list[int], "text": str, "image_positions": list[int],
        "dropped_leading_assistant": bool}``; ``assistant_masks[i] == 1`` for the supervised tokens (the tokens
        starting inside each answer span: answer and terminator). Labels are ``input_ids`` where the mask is 1,
        else -100. ``dropped_leading_assistant``: the conversation's first turn came from the assistant and was
        not rendered. Raises ``ValueError`` if a supervised span cannot be mapped to tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"encode_chat needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    text, spans = _render(messages, template, add_generation_prompt, template_kwargs)
    if image_token is not None and image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; pass image_token_id or add it.")
    input_ids, offsets, image_positions = tokenize_llava(
        tokenizer, text, image_token, image_token_id, int(image_seq_length), add_special_tokens
    )
    mask = supervised_token_mask(text, offsets, spans, image_positions)
    return {
        "input_ids": input_ids,
        "assistant_masks": mask,
        "text": text,
        "image_positions": image_positions,
        "dropped_leading_assistant": drops_leading_assistant(messages),
    }

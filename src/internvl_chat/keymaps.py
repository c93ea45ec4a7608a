"""Checkpoint key maps shared by training and `internvl-chat convert` / `export`: one rule per layout.

    from internvl_chat.keymaps import llava_projector_key, strip_peft

    strip_peft("base_model.model.model.mm_projector.0.weight")     # -> "model.mm_projector.0.weight"
    llava_projector_key("model.mm_projector.2.bias")                # -> "model.multi_modal_projector.linear_2.bias"
    to_llava_hf_key("model.vision_tower.encoder.layers.0.fc1.weight")  # -> "vision_tower.vision_model.encoder..."

Layouts named here:
* PEFT wrappers around a parameter name (`base_model.model.`, `.base_layer.`, `.modules_to_save.default.`,
  `.original_module.`), as our trainer sees them and as LLaVA saved `non_lora_trainables.bin`;
* the original LLaVA projector (`model.mm_projector.{0,2,4...}` in a Sequential with GELUs at odd indices, or a bare
  `model.mm_projector.{weight,bias}` Linear) → ours (`model.multi_modal_projector.linear_{1..N}`);
* the original LLaVA language model (`model.*`, `lm_head.*`) → ours (`model.language_model.*`, `lm_head.*`);
* transformers' Llava (llava-hf, both the 4.x and the 5.x layouts) ↔ ours.
Pure string functions: no torch, importable from every layer above `modeling/`.
"""

from __future__ import annotations

import re

# Mapper result for a known key with no counterpart (rotary caches...): skipped and counted, never an error.
SKIP = "<skip>"

_PEFT_INFIXES = (".base_layer.", ".modules_to_save.default.", ".original_module.")


def strip_peft(name: str) -> str:
    """A parameter name without its PEFT wrappers.

    `base_model.model.X` → `X`; `.base_layer.` / `.modules_to_save.default.` / `.original_module.` → `.`. LLaVA's
    loader also strips one `model.` level when keys start with `model.model.` (a PEFT model saved without its
    `base_model.` level): that level never starts one of our names, so the rule is the same for both readers.
    """
    name = name.removeprefix("base_model.")
    if name.startswith(("model.model.", "model.lm_head.")):
        name = name[len("model.") :]
    for infix in _PEFT_INFIXES:
        name = name.replace(infix, ".")
    return name


_PROJECTOR = re.compile(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$")


def llava_projector_key(name: str, num_linear: int | None = None) -> str | None:
    """Original LLaVA projector key → ours, or None when `name` is no projector Linear of an N-linear projector.

    `mlp{N}x_gelu` is `Sequential(Linear, GELU, Linear, ...)`: the Linears sit at even indices 0, 2, ...; `linear`
    is a bare Linear (`mm_projector.weight`). `num_linear` (when known) bounds the index.
    """
    match = _PROJECTOR.match(name)
    if match is None:
        return None
    index = int(match.group(1) or 0)
    if index % 2 or (num_linear is not None and index // 2 >= max(num_linear, 1)):
        return None
    return f"model.multi_modal_projector.linear_{index // 2 + 1}.{match.group(2)}"


def llava_llm_key(name: str) -> str | None:
    """Original LLaVA / base-LLM key (`model.*`, `lm_head.*`) → ours; SKIP for rotary caches; None otherwise."""
    if name.endswith("rotary_emb.inv_freq"):
        return SKIP
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name.startswith("lm_head."):
        return name
    return None


# transformers' Llava (first match wins): the 4.x layout saved by the published llava-hf checkpoints, then 5.x.
_FROM_LLAVA_HF = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.", "model.vision_tower."),
    ("model.language_model.", "model.language_model."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("lm_head.", "lm_head."),
)
# Ours → the published llava-hf layout (which transformers 5 loads as well).
_TO_LLAVA_HF = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def llava_hf_key(name: str) -> str | None:
    """transformers-Llava key (either layout) → ours; SKIP for rotary caches; None for anything else."""
    for old, new in _FROM_LLAVA_HF:
        if name.startswith(old):
            return SKIP if name.endswith("rotary_emb.inv_freq") else new + name[len(old) :]
    return None


def to_llava_hf_key(name: str) -> str | None:
    """Our key → the llava-hf layout, or None when Llava has no counterpart."""
    for old, new in _TO_LLAVA_HF:
        if name.startswith(old):
            return new + name[len(old) :]
    return None

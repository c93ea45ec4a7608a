"""Factories: build a seed model's config, tokenizer, processor and random-init model from a preset.

    from internvl_chat.factories import create, prepare_tokenizer, build_processor
    model, processor, counts = create("llava-v1.5-7b", None, tokenizer="tests/fixtures/tokenizers/vicuna-v1.5",
                                      tiny=True)

Used by every verb that builds a model (`internvl-chat create`, training from a preset or from parts, convert).
Errors are `ValueError` with a message naming what to change; the command-line layer turns them into one line.
Full size builds the real shapes on the meta device first (seconds), reports the parameter counts, then
materialises random weights in `dtype`; `weights=False` keeps config + processor only. `tiny` keeps the
architecture at a few million parameters (tests, demo, CI). The tokenizer gets `<image>` as a real special token
and a pad token (LLaVA's rule: `unk`, else a new `<pad>`); the vocabulary is padded to a multiple of 64 as the
originals do.
"""

import json
import logging
from pathlib import Path

import torch

from .presets import LLMS, build_config, get_preset, input_size, tower_stats
from .templates import TEMPLATES, get_template

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


def prepare_tokenizer(tokenizer_path: str, model_max_length: int):
    """Loads the tokenizer and adds `<image>` and a pad token; returns (tokenizer, padded vocab size)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except OSError as err:
        raise ValueError(
            f"Could not load the tokenizer {tokenizer_path!r} ({err}). Pass --tokenizer with a local folder "
            "(e.g. tests/fixtures/tokenizers/vicuna-v1.5) when the Hub is not reachable."
        ) from err
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        # LLaVA (conversation versions other than v0) pads with unk; tokenizers without unk get a new <pad>.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"  # batched generation; the training collator pads on its own
    tokenizer.model_max_length = model_max_length
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    return tokenizer, vocab_size


def build_processor(preset_name: str, tokenizer, image_seq_length: int, tiny: bool):
    preset = get_preset(preset_name)
    mean, std = tower_stats(preset.tower)
    return make_processor(
        tokenizer,
        template=preset.template,
        image_mode=preset.image_mode,
        size=input_size(preset, tiny),
        mean=mean,
        std=std,
        image_seq_length=image_seq_length,
    )


def make_processor(tokenizer, template: str, image_mode: str, size: int, mean, std, image_seq_length: int):
    """Our processor from its parts (a preset's, or those `internvl-chat convert` reads off a checkpoint)."""
    from .modeling import InternVLChatImageProcessor, InternVLChatProcessor

    image_processor = InternVLChatImageProcessor(
        image_aspect_ratio=image_mode,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
    )
    spec = TEMPLATES[template]
    return InternVLChatProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=get_template(template),
        image_token=IMAGE_TOKEN,
        image_seq_length=image_seq_length,
        stop_strings=list(spec.stop_strings),
    )


def count_parameters(model) -> dict:
    parts = {
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def create(
    preset: str,
    output: str | None,
    tokenizer: str | None = None,
    tiny: bool = False,
    dtype: str = "bfloat16",
    weights: bool = True,
    seed: int = 0,
):
    """Builds (and saves when `output` is given) a random-init model + processor → (model, processor, counts)."""
    from .modeling import InternVLChatForConditionalGeneration

    spec = get_preset(preset)
    tok, vocab_size = prepare_tokenizer(tokenizer or LLMS[spec.llm]["tokenizer"], spec.model_max_length)
    stop_ids = [tok.convert_tokens_to_ids(s) for s in TEMPLATES[spec.template].stop_strings if s in tok.get_vocab()]
    config = build_config(
        preset,
        vocab_size=vocab_size,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        tiny=tiny,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=stop_ids[0] if stop_ids else tok.eos_token_id,
    )
    config.pad_token_id = tok.pad_token_id
    processor = build_processor(preset, tok, config.image_seq_length, tiny)

    torch.manual_seed(seed)
    if tiny:
        model = InternVLChatForConditionalGeneration(config)
    else:
        # Meta device first: the full 7B/13B shapes build in seconds and give exact parameter counts.
        with torch.device("meta"):
            model = InternVLChatForConditionalGeneration(config)
    counts = count_parameters(model)
    logger.info("preset %s%s: %s", preset, " (tiny)" if tiny else "", json.dumps(counts))

    if not tiny and weights and output:
        model = model.to_empty(device="cpu").to(getattr(torch, dtype))
        model.init_weights()
    elif tiny:
        model = model.to(getattr(torch, dtype) if dtype != "float32" and not tiny else torch.float32)

    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = stop_ids or [tok.eos_token_id]
    model.generation_config.do_sample = False
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        if tiny or weights:
            model.save_pretrained(out)
        else:
            config.save_pretrained(out)
            model.generation_config.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "parameter_counts.json").write_text(json.dumps({"preset": preset, "tiny": tiny, **counts}, indent=2))
        logger.info("wrote %s", out)
    return model, processor, counts

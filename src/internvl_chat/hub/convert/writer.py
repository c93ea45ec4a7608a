"""The one writer: any format's `Plan` → our `internvl_chat_llava` folder (sharded safetensors, config, remote code,
processor, generation config, conversion.json).

Two passes over the sources: the first reads names, shapes and dtypes only (safetensors headers, memory-mapped
`.bin`) and settles every key (mapped, skipped, unknown, resized, missing) before anything is written; the second
streams the tensors into `ShardedWriter`, whose shards are planned in that same order, so each shard is written
and freed as soon as it is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ...factories import IMAGE_TOKEN, make_processor, prepare_tokenizer
from ...keymaps import SKIP
from ...loading import DTYPES
from ..checkpoint_io import ShardedWriter, iter_tensors, tensor_specs, weight_files
from .common import ConversionError, Plan, read_json

logger = logging.getLogger(__name__)

TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def choose_template(llm_type: str, tokenizer, override: str | None) -> str:
    from ...templates import get_template_spec

    if override:
        try:
            return get_template_spec(override).name
        except (KeyError, ValueError) as err:
            raise ConversionError(f"--template {override!r}: {err}") from err
    if llm_type == "phi3":
        return "phi3_instruct"
    if "<|eot_id|>" in tokenizer.get_vocab():
        return "llama3"
    return "vicuna_v1"


def load_tokenizer(folder: Path, model_max_length: int):
    """`prepare_tokenizer` on `folder`, with a one-line error naming the file when a tokenizer file is corrupt."""
    for name in TOKENIZER_JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name)  # "Cannot parse DIR/tokenizer.json: ..." instead of a tokenizers traceback
    try:
        return prepare_tokenizer(str(folder), model_max_length)
    except Exception as err:  # tokenizers raises a bare Exception for a JSON that is not a tokenizer
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConversionError(f"Cannot load the tokenizer in {folder}: {line}") from err


def build_output_config(plan: Plan, tokenizer, vocab_size: int, template: str):
    from ...modeling import InternVLChatConfig

    text = dict(plan.text_config, vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id)
    vision = plan.tower.config
    if getattr(vision, "model_type", None) == "internvl_chat_multipath":
        image_seq_length = vision.num_patches
    else:
        image_seq_length = (plan.tower.input_size // vision.patch_size) ** 2 + (plan.select_strategy == "cls_patch")
    return InternVLChatConfig(
        vision_config=vision,
        text_config=text,
        projector_type=plan.projector_type,
        vision_feature_layer=plan.feature_layer,
        vision_feature_select_strategy=plan.select_strategy,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_seq_length,
        template=template,
        pad_token_id=tokenizer.pad_token_id,
    )


def _is_vocab_matrix(name: str) -> bool:
    return name.endswith("embed_tokens.weight") or name == "lm_head.weight"


def _vocab_grows(name: str, shape: tuple, expected: tuple) -> bool:
    return _is_vocab_matrix(name) and len(shape) == 2 and shape[0] < expected[0] and shape[1:] == tuple(expected[1:])


def fit_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Embedding / lm_head rows padded up to the new vocabulary; new rows are the mean of the old ones."""
    mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)], dim=0)


def _stream_files(source: Path) -> list[Path]:
    return [source] if source.is_file() else weight_files(source)


def _iter_stream(source: Path, files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    from tqdm.auto import tqdm

    for path in tqdm(files, desc=f"converting {source.name}", unit="file", disable=len(files) < 2):
        for name, tensor in iter_tensors(path):
            yield path, name, tensor


def plan_layout(plan: Plan, expected: dict[str, tuple], out_dtype: torch.dtype | None):
    """First pass (no tensor data): the output layout in arrival order and what happens to every source key."""
    layout: dict[str, tuple[tuple, torch.dtype]] = {}
    unknown, skipped, resized = [], [], []
    files = []
    for source, mapper in plan.streams:
        paths = _stream_files(source)
        files.append(paths)
        for path in paths:
            for name, shape, dtype in tensor_specs(path):
                new = mapper(name)
                if new == SKIP:
                    skipped.append(name)
                    continue
                if new is None or new not in expected:
                    unknown.append(f"{name} ({path.name})")
                    continue
                if new in layout:
                    continue  # the same tensor from a second source (tower folder and checkpoint): first wins
                if shape != expected[new]:
                    if not _vocab_grows(new, shape, expected[new]):
                        raise ConversionError(
                            f"Shape mismatch for {name} ({path}): checkpoint {shape}, model expects "
                            f"{expected[new]} as {new}."
                        )
                    resized.append(f"{new}: {shape[0]} -> {expected[new][0]} rows")
                cast = out_dtype is not None and dtype.is_floating_point
                layout[new] = (expected[new], out_dtype if cast else dtype)
    return layout, files, unknown, skipped, resized


def write_model(plan: Plan, dst: Path, dtype: str = "auto", max_shard_size="5GB", allow_unknown=False) -> dict:
    """Writes weights, config, remote code, processor and generation config of `plan` into `dst`."""
    from transformers.dynamic_module_utils import custom_object_save

    from ...modeling import InternVLChatForConditionalGeneration
    from ...templates import get_template_spec

    tokenizer, padded = load_tokenizer(plan.tokenizer_dir, plan.model_max_length)
    source_vocab = int(plan.text_config.get("vocab_size") or 0)
    # Keep a source vocabulary that already covers the tokenizer (llava-hf: 32064); else pad to a multiple of 64.
    vocab_size = source_vocab if source_vocab >= len(tokenizer) else padded
    template = choose_template(plan.text_config["model_type"], tokenizer, plan.template)
    config = build_output_config(plan, tokenizer, vocab_size, template)
    out_dtype = DTYPES.get(dtype)
    config.dtype = dtype if out_dtype is not None else (plan.source_dtype or "float32")

    with torch.device("meta"):
        meta_model = InternVLChatForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in meta_model.state_dict().items()}

    layout, files, unknown, skipped, resized = plan_layout(plan, expected, out_dtype)
    missing = sorted(set(expected) - set(layout))
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing:
        raise ConversionError(f"Missing weights ({len(missing)}) for the {plan.format} conversion: {missing}")
    if unknown and not allow_unknown:
        raise ConversionError(
            f"Unknown keys ({len(unknown)}) in the {plan.format} checkpoint, not converted: {unknown}. "
            "Pass --allow-unknown to convert without them (they are listed in conversion.json)."
        )

    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(dst, layout, max_shard_size=max_shard_size)
    try:
        for (source, mapper), paths in zip(plan.streams, files):
            for _, name, tensor in _iter_stream(source, paths):
                new = mapper(name)
                if new not in layout or new in writer.names:
                    continue  # skipped, unknown (reported above) or a second copy (first wins)
                if plan.transform is not None:
                    tensor = plan.transform(new, tensor)
                if tensor.shape[0] != layout[new][0][0] and _is_vocab_matrix(new):
                    tensor = fit_vocab(tensor, layout[new][0][0])
                writer.add(new, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if skipped:
        logger.info("skipped %d keys with no counterpart (e.g. %s)", len(skipped), skipped[0])
    if unknown:
        logger.warning("left out %d unknown keys: %s", len(unknown), unknown)

    config.save_pretrained(dst)
    custom_object_save(meta_model, dst, config=config)  # the Hub unit, so trust_remote_code loads work
    tower = plan.tower
    processor = make_processor(
        tokenizer,
        template=template,
        image_mode=plan.image_aspect_ratio,
        size=tower.input_size,
        mean=tower.mean,
        std=tower.std,
        image_seq_length=config.image_seq_length,
    )
    processor.save_pretrained(dst)
    generation = meta_model.generation_config
    vocab = tokenizer.get_vocab()
    stop_ids = [tokenizer.convert_tokens_to_ids(s) for s in get_template_spec(template).stop_strings if s in vocab]
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = stop_ids or [tokenizer.eos_token_id]
    generation.do_sample = False
    generation.save_pretrained(dst)
    info = {
        "format": plan.format,
        "template": template,
        "vocab_size": vocab_size,
        "image_token_id": config.image_token_id,
        "tensors": len(writer.names),
        "skipped_keys": skipped,
        "unknown_keys": unknown,
        "resized": resized,
        **plan.notes,
    }
    (dst / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    return info

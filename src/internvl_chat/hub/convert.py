"""`internvl-chat convert`: original research checkpoints → our `internvl_chat_llava` folder (safetensors).

    internvl-chat convert SRC DST [--from FORMAT] [--vision-tower DIR] [--model-base DIR]
                          [--merge-lora | --keep-adapter] [--dtype auto|bfloat16|float16|float32]
                          [--max-shard-size 5GB] [--template NAME] [--image-size N] [--allow-unknown]

    # original LLaVA-1.5 (the CLIP tower is read from a local folder: the flag, or `mm_vision_tower` if local)
    internvl-chat convert llava-v1.5-7b out/llava-7b --vision-tower clip-vit-large-patch14-336
    # stage-1 artifact (mm_projector.bin) over a base LLM → a model ready for stage 2
    internvl-chat convert llava-v1.5-7b-pretrain out/stage2-init --model-base vicuna-7b-v1.5 --vision-tower clip
    # LoRA artifact: merged (default) or kept as a PEFT adapter (DST/adapter) over the converted base
    internvl-chat convert llava-v1.5-7b-lora out/lora --model-base vicuna-7b-v1.5 --vision-tower clip --keep-adapter
    # llava-hf, InternVL-Chat-ViT-6B, LLaVA-HR / LLaVAR-2, ShareGPT4V: auto-detected
    internvl-chat convert llava-hf/llava-1.5-7b-hf out/llava-7b

Formats (`--from`, detected when omitted; `FORMATS` below is the registry, one row per format):
`llava` (LlavaLlamaForCausalLM, model_type "llava"), `stage1` (mm_projector.bin), `lora` (adapter_config.json +
adapter_model.* + non_lora_trainables.bin), `internvl` (InternViT-6B inside the checkpoint, fused qkv), `llava-hr`
(fast/slow towers, adapters, fusion: LLaVA-HR and LLaVAR-2), `sharegpt4v` (model_type "share4v", tower in
`vision_tower/`), `llava-hf` (transformers LlavaForConditionalGeneration, old and new key layouts).

What the output gets, as the originals did it: the tokenizer with `<image>` as a real token and a pad token (unk,
else a new `<pad>`), embeddings and lm_head resized to a multiple of 64 (new rows = mean of the old rows, so no new
token wins an argmax); the template from the source (`vicuna_v1` for LLaVA / InternVL / ShareGPT4V, `phi3_instruct`,
`llama3`); the image processor from the tower (CLIP or ImageNet statistics, pad mode, input size). Weights are
streamed shard by shard into sharded safetensors with an index; `.bin` files are read only with
`torch.load(weights_only=True)`; `rotary_emb.inv_freq` buffers are skipped; unknown or missing keys stop the
conversion with their names (`--allow-unknown` writes the rest and lists the unknown ones in `conversion.json`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_io import (
    CheckpointError,
    ShardedWriter,
    folder_tensor_names,
    iter_tensors,
    read_tensors,
    weight_files,
)

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Original `model_type` → the text model's transformers `model_type` (LLaVA, LLaVA-pp / LLaVAR-2, ShareGPT4V).
LLM_TYPES = {
    "llava": "llama",
    "llava_llama": "llama",
    "share4v": "llama",
    "llava_phi": "phi3",
    "llava_phi3": "phi3",
    "llava_mistral": "mistral",
    "llama": "llama",
    "phi3": "phi3",
    "mistral": "mistral",
}
SKIP = "<skip>"  # mapper result: a known key with no counterpart (logged, counted in conversion.json)


class ConversionError(CheckpointError):
    """The source does not fit the format or our model; the message names the file or the keys."""


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConversionError(f"Missing {path}.") from err
    except ValueError as err:
        raise ConversionError(f"Cannot parse {path}: {err}") from err


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def local_folder(value) -> Path | None:
    if value and Path(str(value)).is_dir():
        return Path(str(value))
    return None


def text_config_from(source: dict, llm_type: str) -> dict:
    """The LLM's config fields out of an original config (LLM fields + `mm_*` fields in one flat dict)."""
    from transformers import AutoConfig

    known = set(AutoConfig.for_model(llm_type).to_dict())
    drop = {"architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "auto_map"}
    fields = {k: v for k, v in source.items() if k in known and k not in drop}
    return {"model_type": llm_type, **fields}


def choose_template(llm_type: str, tokenizer, override: str | None) -> str:
    if override:
        return override
    if llm_type == "phi3":
        return "phi3_instruct"
    if "<|eot_id|>" in tokenizer.get_vocab():
        return "llama3"
    return "vicuna_v1"


def image_mode(value: str | None) -> str:
    # LLaVA's `image_aspect_ratio`: "pad" for finetuned models; "square" (or unset) means the plain CLIP crop.
    if value in (None, "square", "crop"):
        return "square"
    if value in ("pad", "resize"):
        return value
    raise ConversionError(f"image_aspect_ratio {value!r} is not supported (pad, square and resize are).")


# --------------------------------------------------------------------------------------------------------------
# Vision towers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tower:
    """Vision side of the output: config object, image preprocessing, and where its weights come from."""

    config: object
    input_size: int
    mean: tuple
    std: tuple
    folder: Path | None = None  # tower weights from a folder (`vision_model.*`), unless embedded in the checkpoint


def shapes_of(folder: Path) -> dict[str, tuple]:
    """name → shape of every tensor of a folder, without reading data (headers / mmap)."""
    from safetensors import safe_open

    shapes = {}
    for path in weight_files(folder):
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        else:
            shapes.update({name: tuple(t.shape) for name, t in iter_tensors(path)})
    return shapes


def clip_config_from_folder(folder: Path):
    from transformers import CLIPVisionConfig

    config = read_json(folder / "config.json")
    if config.get("model_type") == "clip":  # a full CLIPModel folder (openai/clip-vit-large-patch14-336)
        config = config.get("vision_config", {})
    elif config.get("model_type") not in (None, "clip_vision_model"):
        raise ConversionError(f"{folder / 'config.json'}: expected a CLIP tower, found {config.get('model_type')!r}.")
    drop = {"model_type", "transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"}
    return CLIPVisionConfig(**{k: v for k, v in config.items() if k not in drop})


def clip_config_from_shapes(shapes: dict[str, tuple], prefix: str):
    """CLIP vision config from tensor shapes (heads assumed 64 wide, as every OpenAI / LAION CLIP)."""
    from transformers import CLIPVisionConfig

    hidden = shapes[prefix + "embeddings.class_embedding"][0]
    patch = shapes[prefix + "embeddings.patch_embedding.weight"][-1]
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
    layers = len(
        {k.split(".")[len(prefix.split(".")) + 1] for k in shapes if k.startswith(prefix + "encoder.layers.")}
    )
    logger.warning("No CLIP tower config found: inferring it from the weights (heads of width 64, quick_gelu).")
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        patch_size=patch,
        image_size=math.isqrt(positions - 1) * patch,
        hidden_act="quick_gelu",
    )


def image_processor_dict(folder: Path | None) -> dict | None:
    """The saved image-processor settings: preprocessor_config.json, or inside processor_config.json (5.x)."""
    if folder is None:
        return None
    if (folder / "preprocessor_config.json").is_file():
        return read_json(folder / "preprocessor_config.json")
    if (folder / "processor_config.json").is_file():
        return read_json(folder / "processor_config.json").get("image_processor")
    return None


def clip_preprocessing(folder: Path | None, config) -> tuple[int, tuple, tuple]:
    size, mean, std = config.image_size, CLIP_MEAN, CLIP_STD
    pre = image_processor_dict(folder)
    if pre:
        crop = pre.get("crop_size", size)
        size = crop.get("height", size) if isinstance(crop, dict) else int(crop)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return size, mean, std


def intern_vit_config(folder: Path | None, shapes: dict[str, tuple], prefix: str):
    from internvl_chat.modeling.configuration_intern_vit import InternViTConfig

    known = set(InternViTConfig().to_dict())
    if folder is not None:
        config = read_json(folder / "config.json")
        if config.get("norm_type", "rms_norm") != "rms_norm":
            raise ConversionError(
                f"{folder / 'config.json'}: norm_type {config['norm_type']!r}; only rms_norm towers."
            )
        return InternViTConfig(**{k: v for k, v in config.items() if k in known and k not in ("model_type",)})
    hidden = shapes[prefix + "embeddings.class_embedding"][-1]
    patch = shapes[prefix + "embeddings.patch_embedding.weight"][-1]
    positions = shapes[prefix + "embeddings.position_embedding"][1]
    layers = len(
        {k.split(".")[len(prefix.split(".")) + 1] for k in shapes if k.startswith(prefix + "encoder.layers.")}
    )
    logger.warning("No InternViT config folder: inferring the tower from the weights (heads of width 128).")
    return InternViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        patch_size=patch,
        image_size=math.isqrt(positions - 1) * patch,
        qkv_bias=prefix + "encoder.layers.0.attn.qkv.bias" in shapes,
        qk_normalization=prefix + "encoder.layers.0.attn.q_norm.weight" in shapes,
    )


def tower_folder_mapper(name: str) -> str:
    """Tower-folder keys (CLIPVisionModel / CLIPModel saved by transformers 4.x, or 5.x without the level)."""
    if name.startswith("vision_model."):
        return "model.vision_tower." + name[len("vision_model.") :]
    if name.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "position_ids")):
        return SKIP  # the text half of a CLIPModel folder; LLaVA loads only CLIPVisionModel out of it
    if name.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "model.vision_tower." + name
    return None


# --------------------------------------------------------------------------------------------------------------
# Key mapping of the original LLaVA family (reference.md §8)
# --------------------------------------------------------------------------------------------------------------

_PROJ = re.compile(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$")


def original_mapper(num_linear: int) -> Callable[[str], str | None]:
    from internvl_chat.modeling.modeling_multipath import convert_llava_hr_vision_key

    def map_key(name: str):
        if name.endswith("rotary_emb.inv_freq"):
            return SKIP
        match = _PROJ.match(name)
        if match:
            index = int(match.group(1) or 0)
            # Sequential(Linear, GELU, Linear, ...): linears sit at even indices; `linear` is a bare Linear.
            if index % 2 or index // 2 >= max(num_linear, 1):
                return None
            return f"model.multi_modal_projector.linear_{index // 2 + 1}.{match.group(2)}"
        if name.startswith("model.vision_tower.vision_tower.vision_model."):  # CLIP inside the checkpoint
            return "model.vision_tower." + name[len("model.vision_tower.vision_tower.vision_model.") :]
        if name.startswith("model.vision_tower.vision_tower."):  # InternViT inside the checkpoint
            return "model.vision_tower." + name[len("model.vision_tower.vision_tower.") :]
        if name.startswith("model.vision_tower."):  # LLaVA-HR multi-path encoder
            new = convert_llava_hr_vision_key(name[len("model.vision_tower.") :])
            return SKIP if new is None else "model.vision_tower." + new
        if name.startswith("model.mm_projector") or name.startswith("model.vision_resampler"):
            return None
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
        if name.startswith("lm_head."):
            return name
        return None

    return map_key


# --------------------------------------------------------------------------------------------------------------
# The plan every converter fills, and the one writer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the writer needs: the output config pieces, the tensor streams and the tokenizer source."""

    format: str
    text_config: dict
    tower: Tower
    tokenizer_dir: Path
    streams: list[tuple[Path, Callable[[str], str | None]]]  # (folder or file, key mapper)
    projector_type: str = "mlp2x_gelu"
    feature_layer: int = -2
    select_strategy: str = "patch"
    image_aspect_ratio: str = "pad"
    model_max_length: int = 2048
    template: str | None = None
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # e.g. LoRA merge, on our key names
    source_dtype: str | None = None
    notes: dict = field(default_factory=dict)


def _iter_stream(source: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    from tqdm.auto import tqdm

    files = [source] if source.is_file() else weight_files(source)
    for path in tqdm(files, desc=f"converting {source.name}", unit="file", disable=len(files) < 2):
        for name, tensor in iter_tensors(path):
            yield path, name, tensor


def build_output_config(plan: Plan, tokenizer, vocab_size: int, template: str):
    from internvl_chat.modeling import InternVLChatConfig
    from internvl_chat.templates import get_template_spec

    text = dict(plan.text_config, vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id)
    vision = plan.tower.config
    if getattr(vision, "model_type", None) == "internvl_chat_multipath":
        image_seq_length = vision.num_patches
    else:
        patch = vision.patch_size
        image_seq_length = (plan.tower.input_size // patch) ** 2 + (plan.select_strategy == "cls_patch")
    config = InternVLChatConfig(
        vision_config=vision,
        text_config=text,
        projector_type=plan.projector_type,
        vision_feature_layer=plan.feature_layer,
        vision_feature_select_strategy=plan.select_strategy,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_seq_length,
        template=get_template_spec(template).name,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config


def build_processor(plan: Plan, tokenizer, config, template: str):
    from internvl_chat.modeling import InternVLChatImageProcessor, InternVLChatProcessor
    from internvl_chat.templates import get_template, get_template_spec

    size = plan.tower.input_size
    image_processor = InternVLChatImageProcessor(
        image_aspect_ratio=plan.image_aspect_ratio,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(plan.tower.mean),
        image_std=list(plan.tower.std),
    )
    return InternVLChatProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=get_template(template),
        image_token=IMAGE_TOKEN,
        image_seq_length=config.image_seq_length,
        stop_strings=list(get_template_spec(template).stop_strings),
    )


def _fit_vocab(name: str, tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Embedding / lm_head rows padded up to the new vocabulary; new rows are the mean of the old ones."""
    if tensor.ndim != 2 or tensor.shape[0] >= shape[0] or tensor.shape[1:] != tuple(shape[1:]):
        return tensor
    if not (name.endswith("embed_tokens.weight") or name == "lm_head.weight"):
        return tensor
    mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(shape[0] - tensor.shape[0], -1)], dim=0)


def write_model(plan: Plan, dst: Path, dtype: str = "auto", max_shard_size="5GB", allow_unknown=False) -> dict:
    """Writes weights, config, remote code, processor and generation config of `plan` into `dst`."""
    from transformers.dynamic_module_utils import custom_object_save

    from internvl_chat.factories import prepare_tokenizer
    from internvl_chat.modeling import InternVLChatForConditionalGeneration
    from internvl_chat.templates import get_template_spec

    tokenizer, padded = prepare_tokenizer(str(plan.tokenizer_dir), plan.model_max_length)
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

    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(dst, max_shard_size=max_shard_size, dtype=out_dtype)
    unknown, skipped, resized = [], [], []
    try:
        for source, mapper in plan.streams:
            for path, name, tensor in _iter_stream(source):
                new = mapper(name)
                if new == SKIP:
                    skipped.append(name)
                    continue
                if new is None or new not in expected:
                    unknown.append(f"{name} ({path.name})")
                    continue
                if new in writer.names:
                    continue  # the same tensor from a second source (e.g. tower folder and checkpoint): first wins
                if plan.transform is not None:
                    tensor = plan.transform(new, tensor)
                fitted = _fit_vocab(new, tensor, expected[new])
                if fitted is not tensor:
                    resized.append(f"{new}: {tensor.shape[0]} -> {fitted.shape[0]} rows")
                if tuple(fitted.shape) != expected[new]:
                    raise ConversionError(
                        f"Shape mismatch for {name} ({path}): checkpoint {tuple(fitted.shape)}, model expects "
                        f"{expected[new]} as {new}."
                    )
                writer.add(new, fitted)
        missing = sorted(set(expected) - set(writer.names))
        if config.tie_word_embeddings and "lm_head.weight" in missing:
            missing.remove("lm_head.weight")
        if missing:
            raise ConversionError(f"Missing weights ({len(missing)}) for the {plan.format} conversion: {missing}")
        if unknown and not allow_unknown:
            raise ConversionError(
                f"Unknown keys ({len(unknown)}) in the {plan.format} checkpoint, not converted: {unknown}. "
                "Pass --allow-unknown to convert without them (they are listed in conversion.json)."
            )
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
    processor = build_processor(plan, tokenizer, config, template)
    processor.save_pretrained(dst)
    generation = meta_model.generation_config
    stop_ids = [
        tokenizer.convert_tokens_to_ids(s)
        for s in get_template_spec(template).stop_strings
        if s in tokenizer.get_vocab()
    ]
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


# --------------------------------------------------------------------------------------------------------------
# Formats: detectors (folder → (matches, why)) and converters (args → Plan)
# --------------------------------------------------------------------------------------------------------------


def _config(src: Path) -> dict:
    return read_json(src / "config.json") if (src / "config.json").is_file() else {}


def _names(src: Path) -> list[str]:
    try:
        return folder_tensor_names(src) or []
    except CheckpointError:
        return []


def _is_original(config: dict) -> bool:
    return "mm_vision_tower" in config or "mm_hidden_size" in config or "mm_projector_type" in config


def _is_intern_vit(config: dict, names: list[str]) -> bool:
    tower = str(config.get("mm_vision_tower", "")).lower().replace("-", "_")
    by_name = any(tag in tower for tag in ("intern_vit_6b", "internvit_6b", "internvit6b"))
    return by_name or any(n.endswith(".attn.qkv.weight") and "vision_tower.vision_tower." in n for n in names)


def detect_lora(src: Path):
    return (src / "adapter_config.json").is_file(), "no adapter_config.json"


def detect_stage1(src: Path):
    return (src / "mm_projector.bin").is_file() and not weight_files(src, required=False), "no mm_projector.bin"


def detect_llava_hf(src: Path):
    config = _config(src)
    ok = config.get("model_type") == "llava" and "text_config" in config and not _is_original(config)
    return ok, "config.json is not a transformers LlavaConfig (model_type 'llava' with text_config)"


def detect_sharegpt4v(src: Path):
    return _config(src).get("model_type") == "share4v", "config.json model_type is not 'share4v'"


def detect_llava_hr(src: Path):
    return bool(_config(src).get("is_multipath_encoder")), "config.json has no is_multipath_encoder: true"


def detect_internvl(src: Path):
    config = _config(src)
    return _is_original(config) and _is_intern_vit(config, _names(src)), "no InternViT tower in config.json / weights"


def detect_llava(src: Path):
    config = _config(src)
    ok = (
        _is_original(config)
        and config.get("model_type") in LLM_TYPES
        and not config.get("is_multipath_encoder")
        and not _is_intern_vit(config, _names(src))
        and bool(weight_files(src, required=False))
    )
    return ok, "config.json is not an original LLaVA config (mm_vision_tower, model_type 'llava') with weights"


def _llm_type(config: dict, where: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in LLM_TYPES:
        raise ConversionError(f"{where}: unknown model_type {model_type!r}; known: {sorted(LLM_TYPES)}.")
    return LLM_TYPES[model_type]


def _num_linear(projector_type: str) -> int:
    from internvl_chat.modeling.configuration_internvl_chat import check_projector_type

    return check_projector_type(projector_type)


def _common(config: dict, args, fmt: str, text_source: dict, text_where: Path) -> dict:
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ConversionError(
            f"{args.src / 'config.json'}: mm_use_im_start_end / mm_use_im_patch_token models (LLaVA v0) are not "
            "supported: our processor does not wrap images in <im_start>/<im_end>."
        )
    projector_type = config.get("mm_projector_type", "linear")  # LLaVA's builder default
    return dict(
        format=fmt,
        text_config=text_config_from(text_source, _llm_type(text_source, text_where)),
        projector_type=projector_type,
        feature_layer=int(config.get("mm_vision_select_layer", -2)),
        select_strategy=config.get("mm_vision_select_feature", "patch"),
        image_aspect_ratio=image_mode(config.get("image_aspect_ratio")),
        model_max_length=int(config.get("tokenizer_model_max_length") or 2048),
        template=args.template,
        source_dtype=text_source.get("torch_dtype") or text_source.get("dtype"),
    )


def _clip_tower(config: dict, args, src: Path, names: list[str], allow_embedded: bool = True) -> Tower:
    """CLIP tower: config from --vision-tower / SRC/vision_tower / local mm_vision_tower; weights embedded or there."""
    embedded = allow_embedded and any(n.startswith("model.vision_tower.vision_tower.vision_model.") for n in names)
    candidates = [args.vision_tower, src / "vision_tower", local_folder(config.get("mm_vision_tower"))]
    folder = next((Path(c) for c in candidates if c and (Path(c) / "config.json").is_file()), None)
    if folder is not None:
        vision = clip_config_from_folder(folder)
    elif embedded:
        vision = clip_config_from_shapes(shapes_of(src), "model.vision_tower.vision_tower.vision_model.")
    else:
        raise ConversionError(
            f"The checkpoint has no vision tower and mm_vision_tower {config.get('mm_vision_tower')!r} is not a local "
            "folder: pass --vision-tower DIR (a CLIP folder such as clip-vit-large-patch14-336)."
        )
    size, mean, std = clip_preprocessing(folder, vision)
    if args.image_size:
        size = args.image_size
    return Tower(vision, size, mean, std, folder=None if embedded else folder)


def convert_llava(args, fmt: str = "llava") -> Plan:
    src = args.src
    config = read_json(src / "config.json")
    names = _names(src)
    tower = _clip_tower(config, args, src, names)
    kwargs = _common(config, args, fmt, config, src / "config.json")
    streams = [(src, original_mapper(_num_linear(kwargs["projector_type"])))]
    if tower.folder is not None:
        weight_files(tower.folder)  # fail early, naming the folder
        streams.append((tower.folder, tower_folder_mapper))
    return Plan(tower=tower, tokenizer_dir=_tokenizer_dir(args, src), streams=streams, **kwargs)


def convert_sharegpt4v(args) -> Plan:
    return convert_llava(args, fmt="sharegpt4v")


def convert_internvl(args) -> Plan:
    src = args.src
    config = read_json(src / "config.json")
    names = _names(src)
    prefix = "model.vision_tower.vision_tower."
    folder = next(
        (
            Path(c)
            for c in (args.vision_tower, local_folder(config.get("mm_vision_tower")))
            if c and (Path(c) / "config.json").is_file()
        ),
        None,
    )
    vision = intern_vit_config(folder, {} if folder else shapes_of(src), prefix)
    # The InternVL recipe runs the 224px tower at 336 (position embeddings interpolated), the 448px one at 448.
    size = args.image_size or (vision.image_size if vision.image_size >= 448 else 336)
    tower = Tower(vision, size, IMAGENET_MEAN, IMAGENET_STD)
    kwargs = _common(config, args, "internvl", config, src / "config.json")
    kwargs["feature_layer"] = int(config.get("mm_vision_select_layer", -4))
    streams = [(src, original_mapper(_num_linear(kwargs["projector_type"])))]
    if not any(n.startswith(prefix) for n in names) and folder is not None and weight_files(folder, required=False):
        streams.append(
            (folder, lambda n: "model.vision_tower." + n if n.startswith(("embeddings.", "encoder.")) else None)
        )
    return Plan(tower=tower, tokenizer_dir=_tokenizer_dir(args, src), streams=streams, **kwargs)


def convert_llava_hr(args) -> Plan:
    from internvl_chat.modeling.configuration_multipath import MultiPathVisionConfig

    src = args.src
    config = read_json(src / "config.json")
    shapes = shapes_of(src)
    fast_prefix = "model.vision_tower.fast_vision_tower.vision_tower.vision_model."
    slow_prefix = "model.vision_tower.slow_vision_tower.vision_tower."
    folder = next(
        (
            Path(c)
            for c in (args.vision_tower, local_folder(config.get("mm_vision_tower")))
            if c and (Path(c) / "config.json").is_file()
        ),
        None,
    )
    fast = clip_config_from_folder(folder) if folder else clip_config_from_shapes(shapes, fast_prefix)
    depths = []
    for stage in range(4):
        blocks = {k.split(".")[7] for k in shapes if k.startswith(f"{slow_prefix}stages.{stage}.blocks.")}
        depths.append(len(blocks))
    dims = [shapes[f"{slow_prefix}stages.{stage}.blocks.0.conv_dw.weight"][0] for stage in range(4)]
    adapters = any(k.startswith("model.vision_tower.align_stages_latent.") for k in shapes)
    vision = MultiPathVisionConfig(
        fast_config=fast.to_dict(),
        slow_model_name=str(config.get("vision_tower_slow", "convnext_large_mlp")).split(".")[0],
        slow_depths=depths,
        slow_dims=dims,
        input_image_size=int(config.get("input_image_size", 768)),
        freeze_vision=not adapters,
    )
    tower = Tower(vision, vision.input_image_size, CLIP_MEAN, CLIP_STD)
    kwargs = _common(config, args, "llava-hr", config, src / "config.json")
    streams = [(src, original_mapper(_num_linear(kwargs["projector_type"])))]
    return Plan(tower=tower, tokenizer_dir=_tokenizer_dir(args, src), streams=streams, **kwargs)


def _tokenizer_dir(args, src: Path) -> Path:
    for candidate in (args.tokenizer, src, args.model_base):
        if candidate and has_tokenizer(Path(candidate)):
            return Path(candidate)
    raise ConversionError(
        f"No tokenizer in {src}" + (f" or {args.model_base}" if args.model_base else "") + ": pass --tokenizer DIR."
    )


def _base_llm(args, what: str) -> tuple[Path, dict]:
    if not args.model_base:
        raise ConversionError(
            f"A {what} needs --model-base DIR (the base LLM it was trained on, e.g. vicuna-7b-v1.5)."
        )
    base = Path(args.model_base)
    return base, read_json(base / "config.json")


def _base_llm_mapper(name: str):
    if name.endswith("rotary_emb.inv_freq"):
        return SKIP
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name.startswith("lm_head."):
        return name
    return None


def convert_stage1(args) -> Plan:
    src = args.src
    base, base_config = _base_llm(args, "stage-1 artifact (mm_projector.bin)")
    config = _config(src) or {}
    tower = _clip_tower(config, args, src, [], allow_embedded=False)
    kwargs = _common(config, args, "stage1", base_config, base / "config.json")
    kwargs["image_aspect_ratio"] = "pad"  # the stage-2 recipe (the stage-1 run itself used square crops)
    if not config:
        kwargs["projector_type"] = "mlp2x_gelu" if args.projector_type is None else args.projector_type
    num_linear = _num_linear(kwargs["projector_type"])
    projector = original_mapper(num_linear)
    streams = [(base, _base_llm_mapper), (src / "mm_projector.bin", projector), (tower.folder, tower_folder_mapper)]
    plan = Plan(tower=tower, tokenizer_dir=_tokenizer_dir(args, base), streams=streams, **kwargs)
    plan.notes["model_base"] = str(base)
    return plan


def _strip_peft(name: str) -> str:
    # LLaVA's builder: drop `base_model.` then `model.` when the keys start with `model.model.`.
    name = name[len("base_model.") :] if name.startswith("base_model.") else name
    return name[len("model.") :] if name.startswith("model.model.") or name.startswith("model.lm_head") else name


def convert_lora(args) -> Plan:
    src = args.src
    base, base_config = _base_llm(args, "LoRA artifact")
    adapter_config = read_json(src / "adapter_config.json")
    if adapter_config.get("use_dora"):
        raise ConversionError(f"{src / 'adapter_config.json'}: DoRA adapters are not supported.")
    adapter_files = [p for p in (src / "adapter_model.safetensors", src / "adapter_model.bin") if p.is_file()]
    if not adapter_files:
        raise ConversionError(f"Missing {src / 'adapter_model.safetensors'} (or adapter_model.bin).")
    lora = read_tensors(adapter_files[0])
    config = _config(src) or base_config
    tower = _clip_tower(config, args, src, [], allow_embedded=False)
    kwargs = _common(config, args, "lora", base_config, base / "config.json")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank

    # adapter keys `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` → our module name.
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in lora.items():
        match = re.match(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$", name)
        target = _base_llm_mapper(match.group(1) + ".weight") if match else None
        if target is None or target == SKIP:
            unknown.append(f"{name} ({adapter_files[0].name})")
            continue
        pairs.setdefault(target, {})[match.group(2)] = tensor
    incomplete = [t for t, ab in pairs.items() if set(ab) != {"A", "B"}]
    if unknown or incomplete:
        raise ConversionError(f"Unexpected LoRA keys {unknown} / unpaired lora_A/lora_B for {incomplete}.")
    fan_in_fan_out = bool(adapter_config.get("fan_in_fan_out"))

    def merge(name: str, weight: torch.Tensor) -> torch.Tensor:
        ab = pairs.get(name)
        if ab is None:
            return weight
        delta = (ab["B"].float() @ ab["A"].float()) * scale
        if fan_in_fan_out:
            delta = delta.T
        return (weight.float() + delta).to(weight.dtype)

    non_lora = src / "non_lora_trainables.bin"
    if not non_lora.is_file():
        raise ConversionError(f"Missing {non_lora} (the projector trained next to the LoRA).")
    projector = original_mapper(_num_linear(kwargs["projector_type"]))
    streams = [
        (base, _base_llm_mapper),
        (non_lora, lambda n: projector(_strip_peft(n))),
        (tower.folder, tower_folder_mapper),
    ]
    plan = Plan(tower=tower, tokenizer_dir=_tokenizer_dir(args, base), streams=streams, **kwargs)
    plan.notes.update(model_base=str(base), lora_rank=rank, lora_alpha=alpha, lora_modules=len(pairs))
    if args.keep_adapter:
        plan.notes["adapter"] = "adapter"
        plan.notes["_adapter"] = (adapter_config, pairs, adapter_files[0])
    else:
        plan.transform = merge
        plan.notes["merged_lora"] = True
    return plan


def write_adapter(dst: Path, adapter_config: dict, pairs: dict) -> Path:
    """The LoRA as a PEFT adapter over our model: keys and target modules renamed to our module names."""
    from .checkpoint_io import write_safetensors

    folder = dst / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    modules = set()
    for target, ab in sorted(pairs.items()):
        module = target[: -len(".weight")]
        modules.add(module.rsplit(".", 1)[-1])
        for part in ("A", "B"):
            tensors[f"base_model.model.{module}.lora_{part}.weight"] = ab[part].contiguous()
    write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    config = dict(adapter_config)
    # [IMPORTANT] a plain list of names would also match the CLIP tower's q_proj/k_proj/v_proj in our model;
    # a regex anchored on the language model keeps the LoRA where the original put it.
    config["target_modules"] = rf"^model\.language_model\..*\.({'|'.join(sorted(modules))})$"
    config["base_model_name_or_path"] = str(dst)
    config.pop("modules_to_save", None)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _llava_hf_mapper(name: str):
    for old, new in (
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
    ):
        if name.startswith(old):
            return SKIP if name.endswith("rotary_emb.inv_freq") else new + name[len(old) :]
    return None


def convert_llava_hf(args) -> Plan:
    from transformers import CLIPVisionConfig

    src = args.src
    config = read_json(src / "config.json")
    vision = dict(config.get("vision_config") or {})
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"{src / 'config.json'}: only CLIP towers convert, found {vision.get('model_type')!r}.")
    if config.get("projector_hidden_act", "gelu") != "gelu" or config.get("multimodal_projector_bias") is False:
        raise ConversionError(f"{src / 'config.json'}: only the biased GELU projector (mlp2x_gelu) converts.")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"{src / 'config.json'}: multi-layer vision_feature_layer {layer} is not supported.")
    drop = {"model_type", "transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"}
    vision = CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in drop})
    text = dict(config["text_config"])
    llm_type = text.get("model_type", "llama")
    size, mean, std = clip_preprocessing(src, vision)
    # LlavaImageProcessor's do_pad is LLaVA's expand2square (pad mode); without it the plain CLIP crop.
    mode = "pad" if (image_processor_dict(src) or {}).get("do_pad") else "square"
    tower = Tower(vision, args.image_size or size, mean, std)
    strategy = {"default": "patch", "full": "cls_patch"}.get(config.get("vision_feature_select_strategy", "default"))
    return Plan(
        format="llava-hf",
        text_config=text_config_from(text, llm_type),
        tower=tower,
        tokenizer_dir=_tokenizer_dir(args, src),
        streams=[(src, _llava_hf_mapper)],
        projector_type="mlp2x_gelu",
        feature_layer=layer,
        select_strategy=strategy or "patch",
        image_aspect_ratio=mode,
        model_max_length=2048,
        template=args.template,
        source_dtype=text.get("dtype") or config.get("dtype") or config.get("torch_dtype"),
    )


# Registry: format → (detector, converter). Detection runs in this order; a new format is one row.
FORMATS: dict[str, tuple[Callable, Callable]] = {
    "lora": (detect_lora, convert_lora),
    "stage1": (detect_stage1, convert_stage1),
    "llava-hf": (detect_llava_hf, convert_llava_hf),
    "sharegpt4v": (detect_sharegpt4v, convert_sharegpt4v),
    "llava-hr": (detect_llava_hr, convert_llava_hr),
    "internvl": (detect_internvl, convert_internvl),
    "llava": (detect_llava, convert_llava),
}


def detect_format(src: Path) -> str:
    for name, (detector, _) in FORMATS.items():
        if detector(src)[0]:
            return name
    raise ConversionError(
        f"Cannot tell the checkpoint format of {src} (looked at config.json, adapter_config.json, mm_projector.bin "
        f"and the weight names); pass --from with one of {', '.join(FORMATS)}."
    )


def convert(
    src,
    dst,
    fmt: str | None = None,
    vision_tower=None,
    model_base=None,
    keep_adapter: bool = False,
    dtype: str = "auto",
    max_shard_size="5GB",
    tokenizer=None,
    template: str | None = None,
    image_size: int | None = None,
    allow_unknown: bool = False,
    projector_type: str | None = None,
) -> dict:
    """Converts `src` into `dst` (which must not exist or be empty); returns the conversion summary."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"Source folder {src} does not exist.")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"Output folder {dst} is not empty.")
    if fmt is None:
        fmt = detect_format(src)
        logger.info("detected format: %s", fmt)
    elif fmt not in FORMATS:
        raise ConversionError(f"Unknown --from {fmt!r}; formats: {', '.join(FORMATS)}.")
    else:
        ok, why = FORMATS[fmt][0](src)
        if not ok:
            raise ConversionError(f"{src} does not look like a {fmt!r} checkpoint: {why} (see {src / 'config.json'}).")
    args = argparse.Namespace(
        src=src,
        vision_tower=vision_tower,
        model_base=model_base,
        keep_adapter=keep_adapter,
        tokenizer=tokenizer,
        template=template,
        image_size=image_size,
        projector_type=projector_type,
    )
    plan = FORMATS[fmt][1](args)
    adapter = plan.notes.pop("_adapter", None)
    created = not dst.exists()
    try:
        info = write_model(plan, dst, dtype=dtype, max_shard_size=max_shard_size, allow_unknown=allow_unknown)
        if adapter is not None:
            write_adapter(dst, adapter[0], adapter[1])
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    info.update(source=str(src), output=str(dst))
    return info


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder of the original checkpoint")
    parser.add_argument("dst", help="output folder (must not exist or be empty)")
    parser.add_argument("--from", dest="fmt", choices=sorted(FORMATS), help="source format (default: detect)")
    parser.add_argument("--vision-tower", help="local CLIP / InternViT tower folder (default: mm_vision_tower)")
    parser.add_argument("--model-base", help="base LLM folder for stage-1 and LoRA artifacts")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--merge-lora", dest="keep_adapter", action="store_false", help="merge the LoRA (default)")
    group.add_argument("--keep-adapter", dest="keep_adapter", action="store_true", help="write DST/adapter (PEFT)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="output dtype (auto: as stored)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: SRC, else --model-base)")
    parser.add_argument("--template", help="chat template (default: from the source LLM)")
    parser.add_argument("--image-size", type=int, help="input image size (default: from the tower)")
    parser.add_argument("--projector-type", help="projector of a stage-1 artifact without config.json")
    parser.add_argument("--allow-unknown", action="store_true", help="convert without unknown keys (listed)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = convert(
            args.src,
            args.dst,
            fmt=args.fmt,
            vision_tower=args.vision_tower,
            model_base=args.model_base,
            keep_adapter=args.keep_adapter,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            tokenizer=args.tokenizer,
            template=args.template,
            image_size=args.image_size,
            allow_unknown=args.allow_unknown,
            projector_type=args.projector_type,
        )
    except CheckpointError as err:
        logger.error("error: %s", err)
        return 1
    summary = {k: v for k, v in info.items() if k not in ("skipped_keys", "unknown_keys")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The model zoo: vision towers, LLMs and the seed models built from them, as plain dict rows.

    from internvl_chat.presets import PRESETS, build_config
    config = build_config("llava-v1.5-7b", vocab_size=32064, tiny=False)

Adding a model is one row in `PRESETS` (plus one test row); a new tower or LLM is one row in `TOWERS` / `LLMS`.
`tiny=True` keeps every architectural choice (tower type, select layer, projector, norms, attention layout,
template, image mode) but shrinks widths and depths to a few million parameters, for tests, demos and CI.
Used by `internvl_chat.factories` (`internvl-chat create`, training, convert).
"""

from dataclasses import dataclass, field

# The image statistics live once, in the Hub unit's image processor (the defaults it ships with); rows name them
# ("clip" / "imagenet") and `tower_stats` reads them there, so importing the zoo (e.g. for `--help` choices) does
# not import torch / transformers.
IMAGE_STATS = {
    "clip": ("OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"),
    "imagenet": ("IMAGENET_MEAN", "IMAGENET_STD"),
}

CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}

# Vision towers: the vision_config dict, the feature layer, and the image statistics the tower was trained with.
TOWERS = {
    "clip-vit-l-336": {"config": CLIP_L_336, "feature_layer": -2, "stats": "clip"},
    "intern-vit-6b-224": {
        "config": {"model_type": "intern_vit_6b", "image_size": 224},
        "feature_layer": -4,
        "stats": "imagenet",
    },
    "intern-vit-6b-448": {
        "config": {"model_type": "intern_vit_6b", "image_size": 448},
        "feature_layer": -4,
        "stats": "imagenet",
    },
    "multipath-clip-l-convnext-l": {
        "config": {
            "model_type": "internvl_chat_multipath",
            "fast_config": {k: v for k, v in CLIP_L_336.items() if k != "model_type"},
            "slow_model_name": "convnext_large_mlp",
            "slow_depths": (3, 3, 27, 3),
            "slow_dims": (192, 384, 768, 1536),
            "input_image_size": 768,
        },
        "feature_layer": None,
        "stats": "clip",
    },
}

# LLMs: text_config dicts (random-init shapes of the published models) and the Hub tokenizer they use.
LLMS = {
    "vicuna-7b-v1.5": {
        "config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        },
        "tokenizer": "lmsys/vicuna-7b-v1.5",
    },
    "vicuna-13b-v1.5": {
        "config": {
            "model_type": "llama",
            "hidden_size": 5120,
            "intermediate_size": 13824,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 40,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        },
        "tokenizer": "lmsys/vicuna-13b-v1.5",
    },
    "phi-3.5-mini": {
        # Long-context rope scaling (longrope) of the released model is not reproduced in random-init presets.
        "config": {
            "model_type": "phi3",
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "pad_token_id": 32000,
        },
        "tokenizer": "microsoft/Phi-3.5-mini-instruct",
    },
    "llama-3.1-8b": {
        "config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        "tokenizer": "meta-llama/Llama-3.1-8B-Instruct",
    },
}


@dataclass(frozen=True)
class Preset:
    """One seed model: tower + LLM + projector + template + image preprocessing."""

    tower: str
    llm: str
    template: str
    input_size: int
    image_mode: str = "pad"
    projector_type: str = "mlp2x_gelu"
    select_strategy: str = "patch"
    model_max_length: int = 2048
    notes: str = ""
    extra: dict = field(default_factory=dict)


PRESETS = {
    "llava-v1.5-7b": Preset("clip-vit-l-336", "vicuna-7b-v1.5", "vicuna_v1", 336),
    "llava-v1.5-13b": Preset("clip-vit-l-336", "vicuna-13b-v1.5", "vicuna_v1", 336),
    "internvl-chat-vit6b-224to336-vicuna-7b": Preset("intern-vit-6b-224", "vicuna-7b-v1.5", "vicuna_v1", 336),
    "internvl-chat-vit6b-224to336-vicuna-13b": Preset("intern-vit-6b-224", "vicuna-13b-v1.5", "vicuna_v1", 336),
    "internvl-chat-vit6b-448-vicuna-13b": Preset("intern-vit-6b-448", "vicuna-13b-v1.5", "vicuna_v1", 448),
    "llavar2-phi3.5-mini": Preset(
        "multipath-clip-l-convnext-l", "phi-3.5-mini", "phi3_instruct", 768, model_max_length=4096
    ),
    "llavar2-llama3.1-8b": Preset("multipath-clip-l-convnext-l", "llama-3.1-8b", "llama3", 768, model_max_length=4096),
    "llavar2-vicuna-13b": Preset(
        "multipath-clip-l-convnext-l", "vicuna-13b-v1.5", "vicuna_v1", 768, model_max_length=4096
    ),
    "sharegpt4v-7b": Preset(
        "clip-vit-l-336", "vicuna-7b-v1.5", "vicuna_v1", 336, notes="CLIP layers >= 12 trained in stage 1"
    ),
    "sharegpt4v-13b": Preset(
        "clip-vit-l-336", "vicuna-13b-v1.5", "vicuna_v1", 336, notes="CLIP layers >= 12 trained in stage 1"
    ),
}

# Tiny shapes: same architecture, few parameters. Input sizes shrink so the image-token count stays small.
TINY_INPUT_SIZE = {"clip_vision_model": 56, "intern_vit_6b": 56, "internvl_chat_multipath": 128}
TINY_TOWER = {
    "clip_vision_model": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
    },
    "intern_vit_6b": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6, "num_attention_heads": 2},
}
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]


def tower_config(preset: Preset, tiny: bool) -> dict:
    config = dict(TOWERS[preset.tower]["config"])
    if not tiny:
        return config
    model_type = config["model_type"]
    if model_type == "internvl_chat_multipath":
        fast = {**config["fast_config"], **TINY_TOWER["clip_vision_model"], "image_size": 56}
        return {
            **config,
            "fast_config": fast,
            "slow_depths": (1, 1, 1, 1),
            "slow_dims": (8, 16, 24, 48),
            "input_image_size": TINY_INPUT_SIZE[model_type],
        }
    # The InternViT tiny tower keeps the 224-trained → run-larger property (position embeddings interpolated).
    image_size = 42 if model_type == "intern_vit_6b" and preset.input_size != config.get("image_size") else 56
    return {**config, **TINY_TOWER[model_type], "image_size": image_size}


def llm_config(preset: Preset, tiny: bool) -> dict:
    config = dict(LLMS[preset.llm]["config"])
    if tiny:
        heads_ratio = config["num_attention_heads"] // config["num_key_value_heads"]
        config.update(TINY_LLM, num_key_value_heads=TINY_LLM["num_attention_heads"] // min(heads_ratio, 2))
    return config


def input_size(preset: Preset, tiny: bool) -> int:
    return TINY_INPUT_SIZE[TOWERS[preset.tower]["config"]["model_type"]] if tiny else preset.input_size


def image_seq_length(vision_config: dict, size: int, select_strategy: str) -> int:
    """Image tokens per image: patches of the (fast) grid, plus CLS when it is kept."""
    if vision_config["model_type"] == "internvl_chat_multipath":
        fast = vision_config["fast_config"]
        fast_size = max(size // 32 * fast["patch_size"], fast["image_size"])
        return (fast_size // fast["patch_size"]) ** 2
    patch = vision_config.get("patch_size", 14)
    return (size // patch) ** 2 + (1 if select_strategy == "cls_patch" else 0)


def build_config(name: str, vocab_size: int, image_token_id: int, tiny: bool = False, **text_overrides):
    """InternVLChatConfig for preset `name` with the given vocabulary (after adding `<image>` and padding)."""
    from .modeling import InternVLChatConfig

    preset = get_preset(name)
    vision = tower_config(preset, tiny)
    size = input_size(preset, tiny)
    if vision["model_type"] == "internvl_chat_multipath":
        vision["input_image_size"] = size
    text = {**llm_config(preset, tiny), "vocab_size": vocab_size, **text_overrides}
    feature_layer = TOWERS[preset.tower]["feature_layer"]
    return InternVLChatConfig(
        vision_config=vision,
        text_config=text,
        projector_type=preset.projector_type,
        vision_feature_layer=feature_layer if feature_layer is not None else -1,
        vision_feature_select_strategy=preset.select_strategy,
        image_token_id=image_token_id,
        image_seq_length=image_seq_length(vision, size, preset.select_strategy),
        template=preset.template,
    )


def tower_stats(tower: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a tower was trained with, from the image processor's one definition."""
    from .modeling import image_processing_internvl_chat as image_processing

    mean, std = IMAGE_STATS[TOWERS[tower]["stats"]]
    return getattr(image_processing, mean), getattr(image_processing, std)

"""Tiny checkpoints written in the original research layouts (docs/checkpoints.md), for the convert / export tests.

Every builder writes into a tmp folder: key names, config fields and file names as the original code saved them.
Weights come from independent reference models (transformers' LlavaForConditionalGeneration, LlamaForCausalLM,
CLIPVisionModel, InternVLVisionModel, timm's ConvNeXt, PEFT) so that the converted model can be compared against
the source model computed without our code.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import TOKENIZERS

VOCAB = 32000  # Vicuna's vocabulary: original LLaVA checkpoints keep it (`<image>` is not a token there)
HF_VOCAB = 32064  # llava-hf: `<image>` 32000, `<pad>` 32001, padded to a multiple of 64
IMG = 32000
CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=56,
    patch_size=14,
    hidden_act="quick_gelu",
)
LLM = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
N_IMG = 16  # (56 / 14) ** 2


def randomize_(model, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def reference_llava(seed=0, vocab=HF_VOCAB, select="default"):
    """transformers' Llava with random weights: the source model of the CLIP formats."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP),
        text_config=LlamaConfig(**LLM, vocab_size=vocab),
        image_token_id=IMG,
        image_seq_length=N_IMG + (select == "full"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy=select,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return randomize_(model, seed).eval()


def copy_tokenizer(folder, name="vicuna-v1.5"):
    folder.mkdir(parents=True, exist_ok=True)
    for path in (TOKENIZERS / name).iterdir():
        shutil.copy(path, folder / path.name)


def write_json(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


def write_clip_tower(folder, state, clip=CLIP, fmt="safetensors", clip_model=False):
    """A CLIP tower folder as transformers 4.x saved it (`vision_model.*`); optionally a full CLIPModel."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = {"model_type": "clip_vision_model", **clip}
    config = {"model_type": "clip", "vision_config": vision, "text_config": {}} if clip_model else vision
    write_json(folder / "config.json", {**config, "architectures": ["CLIPVisionModel"]})
    size = clip["image_size"]
    write_json(
        folder / "preprocessor_config.json",
        {
            "crop_size": {"height": size, "width": size},
            "size": {"shortest_edge": size},
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "CLIPImageProcessor",
        },
    )
    tensors = {"vision_model." + k: v.clone().contiguous() for k, v in state.items()}
    if clip_model:
        tensors["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
        tensors["logit_scale"] = torch.tensor(1.0)
    if fmt == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, folder / "pytorch_model.bin")


def llava_parts(llava):
    """Split a transformers Llava state dict into (tower, projector, llm) dicts in original naming."""
    tower, projector, llm = {}, {}, {}
    for key, value in llava.state_dict().items():
        value = value.clone()
        if key.startswith("model.vision_tower."):
            tower[key[len("model.vision_tower.") :]] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = (int(key.split(".")[2][len("linear_") :]) - 1) * 2  # Sequential(Linear, GELU, Linear)
            projector[f"model.mm_projector.{index}.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("model.language_model."):
            llm["model." + key[len("model.language_model.") :]] = value
        elif key == "lm_head.weight":
            llm[key] = value
    llm["model.embed_tokens.weight"] = llm["model.embed_tokens.weight"][:VOCAB].clone()
    llm["lm_head.weight"] = llm["lm_head.weight"][:VOCAB].clone()
    return tower, projector, llm


def original_config(model_type="llava", text=LLM, vocab=VOCAB, **mm):
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": model_type,
        **text,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "mm_hidden_size": CLIP["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 2048,
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        **mm,
    }


def add_inv_freq(state, layers=LLM["num_hidden_layers"]):
    # Older transformers saved the rotary buffers; LLaVA-1.5 checkpoints carry them.
    head_dim = LLM["hidden_size"] // LLM["num_attention_heads"]
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    return state


def write_sharded(folder, state, fmt="bin", shards=2):
    """Weights split over `shards` files with an index, named as transformers 4.x named them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    chunks = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        if fmt == "bin":
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k].contiguous() for k in chunk}, folder / name)
        else:
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k].contiguous() for k in chunk}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    write_json(folder / index, {"metadata": {"total_size": 0}, "weight_map": weight_map})


def write_original_llava(root, llava, fmt="bin", embed_tower=False, model_type="llava"):
    """Original LLaVA-1.5 folder (+ its CLIP tower folder when the tower is not embedded). Returns (src, tower)."""
    tower_state, projector, llm = llava_parts(llava)
    src, tower = root / "llava-src", root / "clip-tower"
    write_clip_tower(tower, tower_state)
    state = add_inv_freq({**llm, **projector})
    if embed_tower:
        state.update({"model.vision_tower.vision_tower.vision_model." + k: v for k, v in tower_state.items()})
    write_sharded(src, state, fmt=fmt)
    write_json(src / "config.json", original_config(model_type, mm_vision_tower=str(tower)))
    copy_tokenizer(src)
    return src, tower


def image_inputs(batch=2, n_img=N_IMG, size=56, seed=1, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, 6), generator=generator)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), ids[:, :2], torch.full((batch, n_img), IMG), ids[:, 2:]], 1
    )
    return ids, torch.randn(batch, 3, size, size, generator=generator)

"""Every seed preset builds at tiny size, saves, reloads and chats; full sizes have the published shapes."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import TOKENIZERS
from internvl_chat.factories import create
from internvl_chat.presets import PRESETS, TOWERS, input_size, tower_stats

TOKENIZER_OF = {"vicuna_v1": "vicuna-v1.5", "phi3_instruct": "phi-3.5-mini", "llama3": "llama-3.1"}


def tokenizer_for(name):
    return str(TOKENIZERS / TOKENIZER_OF[PRESETS[name].template])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tiny_preset_builds_saves_reloads_and_chats(name, tmp_path):
    model, processor, counts = create(name, str(tmp_path), tokenizer=tokenizer_for(name), tiny=True)
    assert counts["total"] < 25_000_000
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    config = loaded.config
    assert config.template == PRESETS[name].template
    assert config.vision_config.model_type == TOWERS[PRESETS[name].tower]["config"]["model_type"]
    assert proc.image_processor.image_size == input_size(PRESETS[name], tiny=True)
    assert tuple(proc.image_processor.image_mean) == tower_stats(PRESETS[name].tower)[0]

    image = Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(images=[image], text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == config.image_seq_length
    with torch.no_grad():
        a = model.eval()(**inputs).logits
        b = loaded(**inputs).logits
        out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.allclose(a, b, atol=1e-5)
    # The blank image distributed training feeds the tower for a batch without images fits every tower.
    with torch.no_grad():
        blank = loaded.model.get_image_features(loaded.model._blank_pixel_values(inputs["pixel_values"]))
    assert blank.shape[0] == 1 and blank.shape[-1] == config.text_config.hidden_size
    # generate == a greedy loop of full forwards (no cache), stopping where generate must stop (eos)
    eos = loaded.generation_config.eos_token_id
    ids, eos = inputs["input_ids"], {eos} if isinstance(eos, int) else set(eos or [])
    with torch.no_grad():
        for _ in range(3):
            step = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            ids = torch.cat([ids, loaded(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if int(ids[0, -1]) in eos:
                break
    assert torch.equal(out, ids)


# Full-size parameter counts (meta device, nothing allocated), checked against the published model sizes.
FULL_SIZES = {
    "llava-v1.5-7b": (7.0e9, 7.2e9),
    "llava-v1.5-13b": (13.2e9, 13.45e9),
    "internvl-chat-vit6b-224to336-vicuna-7b": (12.4e9, 13.0e9),
    "internvl-chat-vit6b-448-vicuna-13b": (18.8e9, 19.3e9),
    "llavar2-llama3.1-8b": (8.5e9, 8.6e9),
    "llavar2-phi3.5-mini": (4.2e9, 4.5e9),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZES))
def test_full_size_shapes_on_meta_device(name):
    model, _, counts = create(name, None, tokenizer=tokenizer_for(name), tiny=False)
    low, high = FULL_SIZES[name]
    assert low <= counts["total"] <= high, counts
    assert next(model.parameters()).device.type == "meta"
    tower = TOWERS[PRESETS[name].tower]["config"]
    if tower["model_type"] == "intern_vit_6b":
        assert 5.5e9 <= counts["vision_tower"] <= 6.0e9  # InternViT-6B (48 layers, width 3200)
    if tower["model_type"] == "clip_vision_model":
        assert 303e6 <= counts["vision_tower"] <= 305e6  # CLIP ViT-L/14-336


def test_llavar2_without_timm_names_the_missing_package(monkeypatch):
    """timm is the `llavar2` extra: only building a multi-path model needs it, and then the error says so."""
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    create("llava-v1.5-7b", None, tokenizer=tokenizer_for("llava-v1.5-7b"), tiny=True)
    with pytest.raises(ImportError, match="needs timm"):
        create("llavar2-phi3.5-mini", None, tokenizer=tokenizer_for("llavar2-phi3.5-mini"), tiny=True)

"""`internvl-chat export`: ours (CLIP tower) → transformers-native Llava, loaded without remote code; the round trip
ours → llava-hf → ours is lossless; what Llava cannot express is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

import checkpoint_fixtures as fx
from internvl_chat import InternVLChatForConditionalGeneration
from internvl_chat.hub.checkpoint_io import CheckpointError
from internvl_chat.hub.convert import convert
from internvl_chat.hub.export import export


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    llava = fx.reference_llava(seed=21)
    src, _ = fx.write_original_llava(root, llava)
    convert(src, root / "ours")
    return root, llava


def test_export_loads_in_transformers_llava_with_same_logits(converted):
    root, _ = converted
    export(root / "ours", root / "hf")
    assert not list((root / "hf").glob("*.py"))  # no remote code
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    state_keys = set(load_file(root / "hf" / "model.safetensors"))
    assert "language_model.model.embed_tokens.weight" in state_keys  # the published llava-hf layout
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in state_keys)

    llava_hf = LlavaForConditionalGeneration.from_pretrained(root / "hf").eval()
    ours = InternVLChatForConditionalGeneration.from_pretrained(root / "ours").eval()
    ids, pixel_values = fx.image_inputs()
    with torch.no_grad():
        a = llava_hf(input_ids=ids, pixel_values=pixel_values).logits
        b = ours(input_ids=ids, pixel_values=pixel_values).logits
    assert (a - b).abs().max().item() <= 1e-5

    # The processors agree too: same ids for the same prompt, same pixels (pad mode ↔ do_pad).
    from PIL import Image

    image = Image.new("RGB", (80, 40), (200, 30, 90))
    hf_processor = AutoProcessor.from_pretrained(root / "hf")
    our_processor = AutoProcessor.from_pretrained(root / "ours")
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    hf_in = hf_processor(images=[image], text=prompt, return_tensors="pt")
    our_in = our_processor(images=[image], text=prompt, return_tensors="pt")
    assert int((hf_in["input_ids"] == fx.IMG).sum()) == fx.N_IMG == int((our_in["input_ids"] == fx.IMG).sum())
    assert hf_processor.image_processor.do_pad is True
    assert (hf_in["pixel_values"] - our_in["pixel_values"]).abs().max().item() < 0.02
    assert hf_processor.chat_template == our_processor.chat_template


def test_round_trip_is_lossless(converted):
    root, _ = converted
    if not (root / "hf").exists():
        export(root / "ours", root / "hf")
    convert(root / "hf", root / "back")  # auto-detected as llava-hf
    a, b = load_file(root / "ours" / "model.safetensors"), load_file(root / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "processor_config.json", "generation_config.json", "chat_template.jinja"):
        assert (root / "ours" / name).read_text() == (root / "back" / name).read_text(), name
    ours_tok = json.loads((root / "ours" / "tokenizer.json").read_text())
    back_tok = json.loads((root / "back" / "tokenizer.json").read_text())
    assert ours_tok["added_tokens"] == back_tok["added_tokens"] and ours_tok["model"] == back_tok["model"]


def test_export_refuses_what_llava_cannot_express(tmp_path):
    from internvl_chat.factories import create

    create(
        "internvl-chat-vit6b-224to336-vicuna-7b",
        str(tmp_path / "internvl"),
        str(fx.TOKENIZERS / "vicuna-v1.5"),
        tiny=True,
    )
    with pytest.raises(CheckpointError, match="Only CLIP-tower models export.*intern_vit_6b"):
        export(tmp_path / "internvl", tmp_path / "hf")
    config = json.loads((tmp_path / "internvl" / "config.json").read_text())
    config.update(vision_config={"model_type": "clip_vision_model"}, projector_type="linear")
    (tmp_path / "internvl" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp2x_gelu.*'linear'"):
        export(tmp_path / "internvl", tmp_path / "hf2")

"""What serving stacks ask a processor: `_get_num_multimodal_tokens` (transformers' serving code, vLLM's
transformers backend), checked against transformers' own `LlavaProcessor` on the same geometry and against the
tokens our processor actually writes."""

import pytest
from PIL import Image
from transformers.processing_utils import MultiModalData

from conftest import TOKENIZERS
from internvl_chat.factories import build_processor, prepare_tokenizer

# (preset, input size, image tokens): a CLIP ViT-L/14 tower keeping all patches (CLS dropped).
GEOMETRIES = [("llava-v1.5-7b", 336, 576), ("internvl-chat-vit6b-448-vicuna-13b", 448, 1024)]
SIZES = [(336, 336), (480, 640), (1000, 120), (7, 3)]


def _ours(preset, seq_length):
    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / "vicuna-v1.5"), 2048)
    return build_processor(preset, tokenizer, seq_length, tiny=False)


def _llava(size):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / "vicuna-v1.5"), 2048)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


@pytest.mark.parametrize("preset,size,tokens", GEOMETRIES)
def test_num_multimodal_tokens_matches_llava_processor(preset, size, tokens):
    ours = _ours(preset, tokens)
    reference = _llava(size)._get_num_multimodal_tokens(image_sizes=[list(s) for s in SIZES])
    got = ours._get_num_multimodal_tokens(image_sizes=[list(s) for s in SIZES])
    assert isinstance(got, MultiModalData)
    assert got.num_image_tokens == reference.num_image_tokens == [tokens] * len(SIZES)
    assert got.num_image_patches == reference.num_image_patches == [1] * len(SIZES)
    # vLLM reads it by key.
    assert "num_image_tokens" in got and got["num_image_patches"] == [1] * len(SIZES)


def test_num_multimodal_tokens_equals_the_tokens_written():
    ours = _ours("llava-v1.5-7b", 576)
    counts = ours._get_num_multimodal_tokens(image_sizes=[(h, w) for h, w in SIZES]).num_image_tokens
    for (h, w), count in zip(SIZES, counts):
        image = Image.new("RGB", (w, h), (120, 30, 200))
        ids = ours(images=[image], text="USER: <image>\nWhat is it? ASSISTANT:")["input_ids"][0]
        assert sum(1 for t in ids if t == ours.image_token_id) == count


def test_num_multimodal_tokens_without_images():
    got = _ours("llava-v1.5-7b", 576)._get_num_multimodal_tokens()
    assert "num_image_tokens" not in got and got.num_image_tokens is None

"""Processor: `<image>` expansion as LLaVA's tokenizer_image_token, count checks, truncation, chat template."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOKENIZERS
from internvl_chat.factories import build_processor, prepare_tokenizer

N = 16  # image tokens of the tiny llava preset (56px / 14)


@pytest.fixture(scope="module")
def processor():
    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / "vicuna-v1.5"), 2048)
    return build_processor("llava-v1.5-7b", tokenizer, N, tiny=True)


def image(w=64, h=40, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def test_image_token_is_a_real_token_and_expanded(processor):
    out = processor(images=[image()], text="<image>\nWhat is this?", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    img = processor.image_token_id
    assert img == 32000 and processor.tokenizer.convert_ids_to_tokens(img) == "<image>"
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids[1 : 1 + N] == [img] * N
    # LLaVA's tokenizer_image_token: the piece after the image is tokenized on its own → "▁" (29871), "\n" (13).
    assert ids[1 + N : 3 + N] == [29871, 13]
    assert out["pixel_values"].shape == (1, 3, 56, 56)


def test_pieces_match_separate_tokenization(processor):
    tok = processor.tokenizer
    text = "USER: <image>\nWhat is it? ASSISTANT:"
    ids = processor(images=[image()], text=text)["input_ids"][0]
    expected = tok("USER: ")["input_ids"] + [processor.image_token_id] * N
    expected += tok("\nWhat is it? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert list(ids) == expected


def test_count_mismatch_errors_name_both_numbers(processor):
    with pytest.raises(ValueError, match=r"2 `<image>` placeholders but 1 images"):
        processor(images=[image()], text="<image> and <image>")
    with pytest.raises(ValueError, match=r"1 `<image>` placeholders but 0 images"):
        processor(text="<image> what?")
    with pytest.raises(ValueError, match=r"Sample 1: 0 `<image>` placeholders in the text but 1 images"):
        processor(images=[[image()], [image()]], text=["<image> a", "b"])


def test_truncation_that_cuts_image_tokens_is_refused(processor):
    text = "<image>\n" + "word " * 40
    ok = processor(images=[image()], text=text, truncation=True, max_length=N + 5)
    assert len(ok["input_ids"][0]) == N + 5
    with pytest.raises(ValueError, match=r"Sample 0: 16 image tokens expected.*10 remain"):
        processor(images=[image()], text=text, truncation=True, max_length=11)


def test_batch_multi_image_text_only_left_padding(processor):
    out = processor(
        images=[[image(seed=1), image(seed=2)], []],
        text=["<image>\n<image>\nCompare.", "Just text, no image at all here."],
        padding=True,
        return_tensors="pt",
    )
    assert out["pixel_values"].shape[0] == 2
    ids, mask = out["input_ids"], out["attention_mask"]
    assert (ids[0] == processor.image_token_id).sum() == 2 * N
    assert (ids[1] == processor.image_token_id).sum() == 0
    short = int(mask.sum(1).argmin())
    assert mask[short, 0] == 0 and mask[short, -1] == 1  # left padding for generation
    assert ids[short, 0] == processor.tokenizer.pad_token_id


def test_apply_chat_template_with_image_blocks(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert prompt == (
        f"{system} USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT:"
    )
    messages[0]["content"][0] = {"type": "image", "image": image()}
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    direct = processor(images=[image()], text=prompt, return_tensors="pt")
    assert torch.equal(out["input_ids"], direct["input_ids"])
    assert torch.allclose(out["pixel_values"], direct["pixel_values"])


def test_post_process_cuts_at_stop_string(processor):
    ids = processor.tokenizer(["A cat.</s>USER: more", "Black."], add_special_tokens=False)["input_ids"]
    assert processor.post_process_image_text_to_text(ids, skip_special_tokens=False) == ["A cat.", "Black."]


def test_processor_round_trip(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "InternVLChatProcessor"
    assert loaded.image_seq_length == N and loaded.stop_strings == ["</s>"]
    assert loaded.chat_template == processor.chat_template
    a = processor(images=[image()], text="<image>\nhi", return_tensors="pt")
    b = loaded(images=[image()], text="<image>\nhi", return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_tokenizer_without_image_token_is_refused():
    from transformers import AutoTokenizer

    from internvl_chat import InternVLChatImageProcessor, InternVLChatProcessor

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "vicuna-v1.5")
    with pytest.raises(ValueError, match="no '<image>' token"):
        InternVLChatProcessor(image_processor=InternVLChatImageProcessor(), tokenizer=tok)


def test_llama3_prompt_gets_the_double_bos_of_the_original_unless_switched_off():
    """LLaVAR-2 Llama-3.1 was trained on [128000, 128000, ...] (LLaVA-pp's llama3 preprocessing): the preset's
    processor reproduces it by default, `double_bos=False` gives one BOS."""
    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / "llama-3.1"), 4096)
    proc = build_processor("llavar2-llama3.1-8b", tokenizer, N, tiny=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert proc(images=[image()], text=prompt)["input_ids"][0][:3] == [128000, 128000, 128006]
    single = proc.apply_chat_template(messages, add_generation_prompt=True, double_bos=False)
    assert proc(images=[image()], text=single)["input_ids"][0][:2] == [128000, 128006]
    messages[0]["content"][0] = {"type": "image", "image": image()}
    out = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["input_ids"][0][:3] == [128000, 128000, 128006]


def test_offsets_follow_the_piecewise_tokens(processor):
    """return_offsets_mapping: each token's characters in its text (image ids: the placeholder; BOS and padding:
    empty), padded on the padding side, as transformers' assistant-mask machinery needs."""
    texts = ["<image>\nWhat is it?", "Hi"]
    out = processor(images=[image()], text=texts, padding=True, padding_side="left", return_offsets_mapping=True)
    for text, ids, offsets, mask in zip(texts, out["input_ids"], out["offset_mapping"], out["attention_mask"]):
        assert len(offsets) == len(ids)
        real = [(t, o) for t, o, m in zip(ids, offsets, mask) if m]
        for token, (start, end) in real:
            if token == processor.tokenizer.bos_token_id:
                assert start == end
            elif token == processor.image_token_id:
                assert text[start:end] == "<image>"
            else:
                assert 0 <= start < end <= len(text)
        starts = [start for _, (start, _) in real]
        assert starts == sorted(starts)
        words = [text[a:b].strip() for t, (a, b) in real if t != processor.image_token_id]
        assert "".join(words) == "".join(text.replace("<image>", "").split())
    assert out["offset_mapping"][1][0] == (0, 0) and out["attention_mask"][1][0] == 0  # left padding

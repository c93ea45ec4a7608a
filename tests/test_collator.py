"""VisionChatCollator: label masks per template (the originals' rules) with the real tokenizers, ids == processor ids,
pixel values == processor's, over-length policies, bad samples, and packed == unpacked loss on a tiny model.

Expected texts are written out literally as the original conversation templates render them; expected ids come from
an independent piecewise tokenizer written here (text cut at `<image>`, first piece with BOS), and expected labels
token by token from the lengths of the tokenized prefixes (everything up to an answer, everything through its
terminator).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from conftest import TOKENIZERS
from internvl_chat.data import DataError
from internvl_chat.modeling import InternVLChatImageProcessor, InternVLChatProcessor
from internvl_chat.templates import get_template
from internvl_chat.training.collator import VisionChatCollator

SEQ = 4  # image tokens per image in these tests (the real 576 only makes the tensors longer)
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
MMTAG_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
LLAMA2_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

MULTI = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What color is it?"},
    {"role": "assistant", "content": "Black."},
]
CAPTION = [
    {"role": "user", "content": [{"type": "image"}]},
    {"role": "assistant", "content": "A black cat on a sofa."},
]

# template → (tokenizer, literal rendered text as a list of (segment, supervised) pieces), as the originals render.
# Segments are cut so that every supervised piece starts right after the role prefix; a separator space before an
# answer belongs to the answer's first SentencePiece token ("▁A"), so it is put on the supervised side.
CASES = {
    "vicuna_v1": (
        "vicuna-v1.5",
        MULTI,
        [
            (f"{VICUNA_SYS} USER: <image>\nWhat is in the image? ASSISTANT:", False),
            (" A cat.</s>", True),
            ("USER: What color is it? ASSISTANT:", False),
            (" Black.</s>", True),
        ],
    ),
    "llava_v1": (
        "vicuna-v1.5",
        MULTI,
        [
            (
                "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is in the "
                "image? ASSISTANT:",
                False,
            ),
            (" A cat.</s>", True),
            ("USER: What color is it? ASSISTANT:", False),
            (" Black.</s>", True),
        ],
    ),
    "v1_mmtag": (
        "vicuna-v1.5",
        MULTI,
        [
            (f"{MMTAG_SYS} USER: <Image><image></Image>\nWhat is in the image? ASSISTANT:", False),
            (" A cat.</s>", True),
            ("USER: What color is it? ASSISTANT:", False),
            (" Black.</s>", True),
        ],
    ),
    "llava_llama_2": (
        "vicuna-v1.5",
        MULTI,
        [
            (f"[INST] <<SYS>>\n{LLAMA2_SYS}\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST]", False),
            (" A cat. </s>", True),
            ("<s>[INST] What color is it? [/INST]", False),
            (" Black. </s>", True),
        ],
    ),
    "mistral_instruct": (
        "vicuna-v1.5",
        MULTI,
        [
            ("[INST] <image>\nWhat is in the image? [/INST]", False),
            (" A cat. </s>", True),
            ("[INST] What color is it? [/INST]", False),
            (" Black. </s>", True),
        ],
    ),
    "plain": ("vicuna-v1.5", CAPTION, [("<image>", False), ("A black cat on a sofa.\n", True)]),
    "phi3_instruct": (
        "phi-3.5-mini",
        MULTI,
        [
            ("<|system|>\nYou are a helpful AI assistant.<|end|>", False),
            ("\n<|user|>\n<image>\nWhat is in the image?<|end|>", False),
            ("\n<|assistant|>\n", False),
            ("A cat.<|end|>", True),
            ("\n<|user|>\nWhat color is it?<|end|>\n<|assistant|>\n", False),
            ("Black.<|end|>", True),
        ],
    ),
    "llama3": (
        "llama-3.1",
        MULTI,
        [
            (
                f"<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{VICUNA_SYS}<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                False,
            ),
            ("A cat.<|eot_id|>", True),
            ("<|start_header_id|>user<|end_header_id|>\n\nWhat color is it?<|eot_id|>", False),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
            ("Black.<|eot_id|>", True),
        ],
    ),
    # LLaVA-1.6's chatml_direct model (Nous-Hermes-2-Yi-34B: Llama SentencePiece with ChatML special tokens) has no
    # fixture tokenizer: the Vicuna one with <|im_start|> / <|im_end|> added as special tokens stands in.
    "chatml_direct": (
        "vicuna-v1.5+chatml",
        MULTI,
        [
            (
                "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the "
                "image?<|im_end|><|im_start|>assistant\n",
                False,
            ),
            ("A cat.<|im_end|>", True),
            ("<|im_start|>user\nWhat color is it?<|im_end|><|im_start|>assistant\n", False),
            ("Black.<|im_end|>", True),
        ],
    ),
}


@functools.cache
def tokenizer_of(name: str):
    folder, _, extra = name.partition("+")
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / folder)
    specials = ["<image>", *(["<|im_start|>", "<|im_end|>"] if extra == "chatml" else [])]
    tok.add_special_tokens({"additional_special_tokens": specials})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


@functools.cache
def processor_of(tok_name: str, template: str) -> InternVLChatProcessor:
    image_processor = InternVLChatImageProcessor(size=28, crop_size=28)
    return InternVLChatProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer_of(tok_name),
        chat_template=get_template(template),
        image_seq_length=SEQ,
    )


def piecewise(tok, text: str) -> list[int]:
    """Independent LLaVA `tokenizer_image_token`: BOS unless the text starts with it, pieces around `<image>`."""
    image_id = tok.convert_tokens_to_ids("<image>")
    bos = not text.startswith(tok.bos_token)
    ids: list[int] = []
    for j, piece in enumerate(text.split("<image>")):
        if j:
            ids += [image_id] * SEQ
        if piece or (j == 0 and bos):
            ids += tok(piece, add_special_tokens=(j == 0 and bos))["input_ids"]
    return ids


def image(seed: int = 0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("template", list(CASES))
def test_label_mask_matches_reference_spans(template):
    tok_name, messages, segments = CASES[template]
    tok = tokenizer_of(tok_name)
    collator = VisionChatCollator(processor_of(tok_name, template), template=template)
    text = "".join(seg for seg, _ in segments)
    n_images = text.count("<image>")
    sample = {"id": f"{template}-0", "messages": messages, "images": [image(i) for i in range(n_images)]}
    batch = collator([sample])

    expected_ids = piecewise(tok, text)
    expected_labels = [-100] * len(expected_ids)
    prefix = ""
    for seg, supervised in segments:
        start = len(piecewise(tok, prefix)) if prefix else 0
        prefix += seg
        ids_through = piecewise(tok, prefix)
        assert ids_through == expected_ids[: len(ids_through)], f"{template}: prefix tokenization is not a prefix"
        if supervised:
            expected_labels[start : len(ids_through)] = ids_through[start:]
    ids = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    assert ids == expected_ids
    assert labels == expected_labels, [(tok.convert_ids_to_tokens(i), label) for i, label in zip(ids, labels)]
    # Decoded supervised runs are exactly the answers and their terminators; image tokens never supervised.
    answers = [seg.lstrip(" ") for seg, supervised in segments if supervised]
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != -100:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    decoded = [tok.decode(run).lstrip(" ") for run in runs]
    assert decoded == answers
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == SEQ * n_images
    assert all(label == -100 for i, label in zip(ids, labels) if i == image_id)
    assert collator.stats["samples"] == 1 and collator.stats["skipped_over_length"] == 0


def test_llama3_double_bos_option():
    collator = VisionChatCollator(
        processor_of("llama-3.1", "llama3"), template="llama3", template_kwargs={"double_bos": True}
    )
    ids = collator([{"messages": MULTI, "images": [image()]}])["input_ids"][0].tolist()
    assert ids[:3] == [128000, 128000, 128006]


CLEAN = [
    {"id": "img-1", "messages": MULTI, "images": ["a"]},
    {"id": "txt-1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {
        "id": "two-images",
        "messages": [
            {"role": "user", "content": "<image>\n<image>\nSame animal?"},
            {"role": "assistant", "content": "Yes."},
        ],
        "images": ["a", "b"],
    },
    {
        "id": "system",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Name it."}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Cat."}]},
        ],
        "images": ["c"],
    },
]


def with_images(samples):
    return [{**s, "images": [image(k) for k, _ in enumerate(s.get("images") or [])]} for s in samples]


@pytest.mark.parametrize(
    "tok_name,template",
    [("vicuna-v1.5", "vicuna_v1"), ("phi-3.5-mini", "phi3_instruct"), ("llama-3.1", "llama3")],
)
def test_ids_and_pixels_equal_processor(tok_name, template):
    processor = processor_of(tok_name, template)
    collator = VisionChatCollator(processor)  # template from processor.chat_template
    samples = with_images(CLEAN)
    batch = collator(samples)
    all_images = [im for s in samples for im in s["images"]]
    expected_pixels = processor(
        text=[processor.apply_chat_template(s["messages"]) for s in samples],
        images=[s["images"] for s in samples],
        padding=True,
        return_tensors="pt",
    )["pixel_values"]
    assert torch.equal(batch["pixel_values"], expected_pixels)
    assert len(all_images) == batch["pixel_values"].shape[0]
    for row, sample in enumerate(samples):
        prompt = processor.apply_chat_template(sample["messages"])
        bos = processor.tokenizer.bos_token
        ref = processor(text=prompt, images=sample["images"] or None, add_special_tokens=not prompt.startswith(bos))
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == ref["input_ids"][0]
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["labels"][row, :n] != -100).any()  # zero dropped / zeroed samples
    assert collator.stats["samples"] == len(samples)


def test_bad_samples_raise_with_id_and_source():
    collator = VisionChatCollator(processor_of("vicuna-v1.5", "vicuna_v1"))
    base = {"source": "train.json"}
    cases = {
        "image_count": {"id": "x1", "messages": MULTI, "images": [], **base},
        "empty_conversation": {"id": "x2", "messages": [], **base},
        "no_answer": {"id": "x3", "messages": [{"role": "user", "content": "Hi"}], **base},
        "unknown_role": {
            "id": "x4",
            "messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
            **base,
        },
    }
    for kind, sample in cases.items():
        with pytest.raises(DataError) as info:
            collator([sample])
        assert info.value.kind == kind
        assert sample["id"] in str(info.value) and "train.json" in str(info.value)


def test_over_length_policies(caplog):
    processor = processor_of("vicuna-v1.5", "vicuna_v1")
    long_answer = " ".join(["word"] * 60)
    long = {
        "id": "long",
        "source": "f.json",
        "messages": [MULTI[0], {"role": "assistant", "content": long_answer}],
        "images": [image()],
    }
    short = {"id": "short", "messages": CLEAN[1]["messages"]}
    late_image = {
        "id": "late",
        "messages": [
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": long_answer},
            {"role": "user", "content": "<image>\nAnd this?"},
            {"role": "assistant", "content": "A dog."},
        ],
        "images": [image()],
    }
    full = VisionChatCollator(processor).encode(long)["length"]
    image_end = max(VisionChatCollator(processor).encode(late_image)["image_positions"]) + 1

    with pytest.raises(DataError, match="long.*max_length"):
        VisionChatCollator(processor, max_length=full - 5)([long, short])

    skip = VisionChatCollator(processor, max_length=full - 5, over_length="skip")
    with caplog.at_level(logging.WARNING):
        batch = skip([long, short])
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch
    assert skip.stats["skipped_over_length"] == 1 and skip.stats["over_length"] == 1
    assert "long" in caplog.text
    with pytest.raises(DataError, match="every sample"):
        skip([long])

    trunc = VisionChatCollator(processor, max_length=full - 5, over_length="truncate")
    batch = trunc([long, short])
    assert batch["input_ids"].shape == (2, full - 5)
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == SEQ
    assert (batch["labels"][0] != -100).sum() > 0
    assert trunc.stats["truncated"] == 1 and trunc.stats["skipped_over_length"] == 0
    # A cut inside the image tokens is never made: the sample is skipped and counted instead.
    cut = VisionChatCollator(processor, max_length=image_end - 2, over_length="truncate")
    batch = cut([late_image, short])
    assert batch["input_ids"].shape[0] == 1
    assert cut.stats["skipped_over_length"] == 1 and cut.stats["truncated"] == 0


def test_max_length_defaults_to_model_max_length():
    processor = processor_of("vicuna-v1.5", "vicuna_v1")
    assert VisionChatCollator(processor).max_length == processor.tokenizer.model_max_length


def test_packed_layout():
    collator = VisionChatCollator(processor_of("vicuna-v1.5", "vicuna_v1"), packing=True, pad_to_multiple_of=64)
    unpacked = VisionChatCollator(processor_of("vicuna-v1.5", "vicuna_v1"))
    samples = with_images(CLEAN)
    packed, plain = collator(samples), unpacked(samples)
    lengths = plain["attention_mask"].sum(1).tolist()
    total = sum(lengths)
    assert packed["input_ids"].shape == (1, (total + 63) // 64 * 64)
    assert "attention_mask" not in packed and packed["use_cache"] is False
    expected_cu = np.cumsum([0, *lengths, *[1] * (packed["input_ids"].shape[1] - total)]).tolist()
    assert packed["cu_seq_lens_q"].tolist() == expected_cu and packed["cu_seq_lens_q"].dtype == torch.int32
    assert packed["max_length_q"] == max(lengths)
    pos = packed["position_ids"][0].tolist()
    offset = 0
    for row, n in enumerate(lengths):
        assert pos[offset : offset + n] == list(range(n))
        assert packed["input_ids"][0, offset : offset + n].tolist() == plain["input_ids"][row, :n].tolist()
        # first label of each sample is ignored (never a target unpacked either), the rest are the same
        assert packed["labels"][0, offset].item() == -100
        assert packed["labels"][0, offset + 1 : offset + n].tolist() == plain["labels"][row, 1:n].tolist()
        offset += n
    assert torch.equal(packed["pixel_values"], plain["pixel_values"])


@pytest.fixture(scope="module")
def tiny_llava():
    from internvl_chat.factories import create

    model, processor, _ = create("llava-v1.5-7b", None, tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    return model, processor


@pytest.mark.parametrize("attn", ["eager", "sdpa", "internvl_varlen"])
def test_packed_loss_equals_unpacked(tiny_llava, attn, monkeypatch):
    from internvl_chat.modeling import modeling_varlen_attention as varlen

    model, processor = tiny_llava
    model.set_attn_implementation(attn)
    assert model.config.text_config._attn_implementation == attn
    calls = []  # on CPU the varlen branch runs its per-sample reference; count that it really ran
    reference = varlen._reference_varlen
    monkeypatch.setattr(varlen, "_reference_varlen", lambda *a: calls.append(1) or reference(*a))
    model.train()  # dropout is 0 in the tiny config; train mode is what the trainer runs
    samples = with_images(CLEAN)
    plain = VisionChatCollator(processor)(samples)
    packed = VisionChatCollator(processor, packing=True)(samples)
    torch.manual_seed(0)
    with torch.no_grad():
        loss_plain = model(**plain).loss
        loss_packed = model(**packed).loss
        # The same packed row with a cache (transformers' default use_cache=True) loses the block-diagonal mask:
        # the samples then attend to each other and the loss moves -- this is what use_cache=False prevents.
        leaky = model(**{**packed, "use_cache": True}).loss
    assert torch.allclose(loss_plain, loss_packed, atol=1e-5, rtol=1e-5), (loss_plain, loss_packed)
    if attn == "internvl_varlen":
        # cu_seq_lens reach every LLM layer (2 packed forwards so far); with a cache, still no leak across samples.
        assert len(calls) == 2 * model.config.text_config.num_hidden_layers
        assert torch.allclose(loss_plain, leaky, atol=1e-5)
    else:
        assert not torch.allclose(loss_plain, leaky, atol=1e-4)
    # Per-token agreement, not only the mean: logits of each sample equal the unpacked row's.
    with torch.no_grad():
        logits_plain = model(**plain).logits
        logits_packed = model(**packed).logits
    offset = 0
    for row, n in enumerate(plain["attention_mask"].sum(1).tolist()):
        assert torch.allclose(logits_packed[0, offset : offset + n], logits_plain[row, :n], atol=1e-4)
        offset += n

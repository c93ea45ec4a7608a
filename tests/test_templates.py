"""Conversation templates: exact text and assistant masks on real tokenizers.

Expected strings are written out literally here, from the reference and the original LLaVA / LLaVA-pp code,
never produced by the code under test.
"""

from __future__ import annotations

import pathlib

import jinja2
import pytest
from transformers import AutoTokenizer

from internvl_chat.modeling.processing_internvl_chat import supervised_token_mask
from internvl_chat.templates import (
    ALIASES,
    HELPERS_PLACEHOLDER,
    TEMPLATES,
    TemplateSpec,
    encode_chat,
    get_template,
    get_template_spec,
    render_chat,
)

TOKENIZERS = pathlib.Path(__file__).parent / "fixtures" / "tokenizers"
TEMPLATES_FOLDER = pathlib.Path(__file__).parents[1] / "src" / "internvl_chat" / "templates"

ALL_NAMES = [
    "plain",
    "vicuna_v1",
    "llava_v1",
    "v1_mmtag",
    "llava_llama_2",
    "mistral_instruct",
    "chatml_direct",
    "phi3_instruct",
    "llama3",
]

# ----------------------------------------------------------------------------------------------- conversations
SINGLE = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": "A cat."},
]
MULTI = [
    {"role": "user", "content": "<image>\nWhat is in the image?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What color is it?"},
    {"role": "assistant", "content": "Black."},
]
TEXT_ONLY = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
]
SYSTEM = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": "A cat."},
]
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]

# -------------------------------------------------------------------------------- system prompts, verbatim
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
LLAVA = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.The visual content will be provided with the following format: <Image>visual content</Image>."
)
LLAMA2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

EXPECTED = {
    "vicuna_v1": {
        "single": VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
        "multi": VICUNA
        + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT: Black.</s>",
        "text": VICUNA + " USER: Hello! ASSISTANT: Hi there.</s>",
        "system": "Be brief. USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
        "prompt": VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT:",
    },
    "llava_v1": {
        "single": LLAVA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
        "multi": LLAVA
        + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT: Black.</s>",
        "text": LLAVA + " USER: Hello! ASSISTANT: Hi there.</s>",
        "system": "Be brief. USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
        "prompt": LLAVA + " USER: <image>\nWhat is in the image? ASSISTANT:",
    },
    "v1_mmtag": {
        "single": MMTAG + " USER: <Image><image></Image>\nWhat is in the image? ASSISTANT: A cat.</s>",
        "multi": MMTAG + " USER: <Image><image></Image>\nWhat is in the image? ASSISTANT: A cat.</s>"
        "USER: What color is it? ASSISTANT: Black.</s>",
        "text": MMTAG + " USER: Hello! ASSISTANT: Hi there.</s>",
        "system": "Be brief. USER: <Image><image></Image>\nWhat is in the image? ASSISTANT: A cat.</s>",
        "prompt": MMTAG + " USER: <Image><image></Image>\nWhat is in the image? ASSISTANT:",
    },
    "llava_llama_2": {
        "single": "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s>",
        "multi": "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the "
        "visual content that the user provides, and assist the user with a variety of tasks using natural language."
        "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s><s>[INST] What color is it? [/INST] "
        "Black. </s>",
        "text": "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\nHello! [/INST] Hi there. </s>",
        "system": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s>",
        "prompt": "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST]",
    },
    "mistral_instruct": {
        "single": "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>",
        "multi": "[INST] <image>\nWhat is in the image? [/INST] A cat. </s>"
        "[INST] What color is it? [/INST] Black. </s>",
        "text": "[INST] Hello! [/INST] Hi there. </s>",
        "system": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s>",
        "prompt": "[INST] <image>\nWhat is in the image? [/INST]",
    },
    "chatml_direct": {
        "single": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?"
        "<|im_end|><|im_start|>assistant\nA cat.<|im_end|>",
        "multi": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?"
        "<|im_end|><|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
        "<|im_start|>assistant\nBlack.<|im_end|>",
        "text": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHello!<|im_end|>"
        "<|im_start|>assistant\nHi there.<|im_end|>",
        "system": "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>",
        "prompt": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the image?"
        "<|im_end|><|im_start|>assistant\n",
    },
    "phi3_instruct": {
        "single": "<|system|>\nYou are a helpful AI assistant.<|end|>\n"
        "<|user|>\n<image>\nWhat is in the image?<|end|>\n<|assistant|>\nA cat.<|end|>",
        "multi": "<|system|>\nYou are a helpful AI assistant.<|end|>\n"
        "<|user|>\n<image>\nWhat is in the image?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
        "<|user|>\nWhat color is it?<|end|>\n<|assistant|>\nBlack.<|end|>",
        "text": "<|system|>\nYou are a helpful AI assistant.<|end|>\n"
        "<|user|>\nHello!<|end|>\n<|assistant|>\nHi there.<|end|>",
        "system": "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\n<image>\nWhat is in the image?<|end|>\n<|assistant|>\nA cat.<|end|>",
        "prompt": "<|system|>\nYou are a helpful AI assistant.<|end|>\n"
        "<|user|>\n<image>\nWhat is in the image?<|end|>\n<|assistant|>\n",
    },
    "llama3": {
        "single": "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + VICUNA
        + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>",
        "multi": "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + VICUNA
        + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat color is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlack.<|eot_id|>",
        "text": "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + VICUNA
        + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there.<|eot_id|>",
        "system": "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>",
        "prompt": "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + VICUNA
        + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    },
    # plain: the user turn becomes the bare image (its text dropped), the caption is followed by "\n".
    "plain": {
        "single": "<image>A cat.\n",
        "multi": "<image>A cat.\nBlack.\n",
        "text": "Hi there.\n",
        "system": "<image>A cat.\n",
        "prompt": "<image>",
    },
}
CASES = {"single": SINGLE, "multi": MULTI, "text": TEXT_ONLY, "system": SYSTEM}

# The supervised text of each case: answer + terminator of every assistant turn.
SUPERVISED = {
    "vicuna_v1": {"single": ["A cat.</s>"], "multi": ["A cat.</s>", "Black.</s>"]},
    "llava_llama_2": {"single": ["A cat. </s>"], "multi": ["A cat. </s>", "Black. </s>"]},
    "mistral_instruct": {"single": ["A cat. </s>"], "multi": ["A cat. </s>", "Black. </s>"]},
    "chatml_direct": {"single": ["A cat.<|im_end|>"], "multi": ["A cat.<|im_end|>", "Black.<|im_end|>"]},
    "phi3_instruct": {"single": ["A cat.<|end|>"], "multi": ["A cat.<|end|>", "Black.<|end|>"]},
    "llama3": {"single": ["A cat.<|eot_id|>"], "multi": ["A cat.<|eot_id|>", "Black.<|eot_id|>"]},
    "plain": {"single": ["A cat.\n"], "multi": ["A cat.\n", "Black.\n"]},
}


@pytest.fixture(scope="module")
def tokenizers():
    return {
        name: AutoTokenizer.from_pretrained(TOKENIZERS / name) for name in ("vicuna-v1.5", "phi-3.5-mini", "llama-3.1")
    }


# --------------------------------------------------------------------------------------------------- registry
def test_registry_entries_and_files():
    assert sorted(TEMPLATES) == sorted(ALL_NAMES)
    for name, spec in TEMPLATES.items():
        assert isinstance(spec, TemplateSpec)
        assert spec.name == name
        source = get_template(name)
        assert "{% generation %}" in source.replace("{%- generation -%}", "{% generation %}")
    assert TEMPLATES["vicuna_v1"].stop_strings == ("</s>",)
    assert TEMPLATES["phi3_instruct"].stop_strings == ("<|end|>",)
    assert TEMPLATES["llama3"].stop_strings == ("<|eot_id|>",)
    # The default system prompts, verbatim (the text is checked in full in the rendering tests).
    assert render_chat(TEXT_ONLY, "vicuna_v1").startswith(VICUNA + " USER:")
    assert render_chat(TEXT_ONLY, "v1_mmtag").startswith(MMTAG + " USER:")
    assert render_chat(TEXT_ONLY, "llava_llama_2").startswith("[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>")


def test_templates_compose_the_shared_helpers_once():
    """Each template file holds only its own part; the helper block lives in _helpers.jinja and is composed in."""
    folder = pathlib.Path(TEMPLATES_FOLDER)
    helpers = (folder / "_helpers.jinja").read_text()
    for name, spec in TEMPLATES.items():
        raw = (folder / spec.file).read_text()
        assert "macro turn" not in raw and raw.count(HELPERS_PLACEHOLDER) == 1
        composed = get_template(name)
        assert composed == raw.replace(HELPERS_PLACEHOLDER, helpers) and composed.count("macro turn") == 1


def test_alias_v1():
    assert ALIASES["v1"] == "vicuna_v1"
    assert get_template("v1") == get_template("vicuna_v1")
    assert get_template_spec("v1").name == "vicuna_v1"
    assert render_chat(MULTI, "v1") == EXPECTED["vicuna_v1"]["multi"]


def test_unknown_template_name():
    with pytest.raises(ValueError) as info:
        get_template("vicuna_v9")
    message = str(info.value)
    assert "'vicuna_v9'" in message
    for name in ALL_NAMES:
        assert name in message
    with pytest.raises(ValueError, match="vicuna_v9"):
        render_chat(MULTI, "vicuna_v9")


# --------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("case", ["single", "multi", "text", "system"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_exact_text(name, case):
    assert render_chat(CASES[case], name) == EXPECTED[name][case]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_generation_prompt(name):
    assert render_chat(QUESTION, name, add_generation_prompt=True) == EXPECTED[name]["prompt"]


def test_generation_prompt_endings():
    # The exact tails that LLaVA's get_prompt() leaves for an empty assistant message.
    assert render_chat(QUESTION, "vicuna_v1", add_generation_prompt=True).endswith("? ASSISTANT:")
    assert render_chat(QUESTION, "phi3_instruct", add_generation_prompt=True).endswith("<|end|>\n<|assistant|>\n")
    assert render_chat(QUESTION, "llama3", add_generation_prompt=True).endswith(
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render_chat(QUESTION, "chatml_direct", add_generation_prompt=True).endswith(
        "<|im_end|><|im_start|>assistant\n"
    )
    # [INST] layouts: the user turn already ends with [/INST]; nothing is appended.
    for name in ("llava_llama_2", "mistral_instruct"):
        assert render_chat(QUESTION, name, add_generation_prompt=True) == render_chat(QUESTION, name)
    # plain: the captioning prompt is the bare image.
    assert render_chat(QUESTION, "plain", add_generation_prompt=True) == "<image>"


def test_second_turn_prompt():
    messages = MULTI[:3]
    assert render_chat(messages, "vicuna_v1", add_generation_prompt=True) == (
        VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT:"
    )
    assert render_chat(messages, "llava_llama_2", add_generation_prompt=True) == (
        "[INST] <<SYS>>\n" + LLAMA2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s>"
        "<s>[INST] What color is it? [/INST]"
    )


# ----------------------------------------------------------------------------------------- image placement
def test_multi_image_and_literal_image():
    two_images = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare them."}, {"type": "image"}]},
        {"role": "assistant", "content": "Same."},
    ]
    assert (
        render_chat(two_images, "vicuna_v1") == VICUNA + " USER: <image>\n<image>\nCompare them. ASSISTANT: Same.</s>"
    )
    assert render_chat(two_images, "v1_mmtag") == (
        MMTAG + " USER: <Image><image></Image>\n<Image><image></Image>\nCompare them. ASSISTANT: Same.</s>"
    )
    assert render_chat(two_images, "plain") == "<image><image>Same.\n"

    # A literal <image> anywhere in a plain-string turn is moved to the front and the text stripped.
    literal = [{"role": "user", "content": "  Describe <image> this. "}, {"role": "assistant", "content": "Ok."}]
    assert render_chat(literal, "vicuna_v1") == VICUNA + " USER: <image>\nDescribe  this. ASSISTANT: Ok.</s>"
    assert render_chat(literal, "phi3_instruct") == (
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nDescribe  this.<|end|>\n"
        "<|assistant|>\nOk.<|end|>"
    )
    # Image block after the text: still first.
    after = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]}]
    assert render_chat(after, "vicuna_v1", add_generation_prompt=True) == (
        VICUNA + " USER: <image>\nWhat is it? ASSISTANT:"
    )
    # An image-only turn is just the image (LLaVA strips the trailing newline).
    only = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "A dog."}]
    assert render_chat(only, "vicuna_v1") == VICUNA + " USER: <image> ASSISTANT: A dog.</s>"
    # A turn without an image is verbatim (not stripped).
    spaced = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]
    assert render_chat(spaced, "vicuna_v1") == VICUNA + " USER:  hi  ASSISTANT: yo</s>"


def test_unsupported_role_raises():
    with pytest.raises(jinja2.exceptions.TemplateError, match="tool"):
        render_chat([{"role": "tool", "content": "x"}], "vicuna_v1")
    # A first turn from the assistant is dropped (the original preprocessing skips it), not an error.
    greeting = [{"role": "assistant", "content": "x"}, *MULTI]
    for name in ALL_NAMES:
        assert render_chat(greeting, name) == render_chat(MULTI, name)


# ------------------------------------------------------------------------------------ transformers renders it
@pytest.mark.parametrize("case", ["single", "multi", "text", "system"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_tokenizer_apply_chat_template_matches(tokenizers, name, case):
    tokenizer = tokenizers["vicuna-v1.5"]
    rendered = tokenizer.apply_chat_template(CASES[case], chat_template=get_template(name), tokenize=False)
    assert rendered == render_chat(CASES[case], name) == EXPECTED[name][case]
    prompt = tokenizer.apply_chat_template(
        QUESTION, chat_template=get_template(name), tokenize=False, add_generation_prompt=True
    )
    assert prompt == EXPECTED[name]["prompt"]


# ------------------------------------------------------------------------------------------ assistant masks
def _labels_after(tokens, header, terminator):
    """Independent reference labels: supervise every token after ``header`` up to and including ``terminator``."""
    labels = [False] * len(tokens)
    i = 0
    while i < len(tokens):
        if tokens[i : i + len(header)] == header:
            j = i + len(header)
            while tokens[j] != terminator:
                labels[j] = True
                j += 1
            labels[j] = True
            i = j + 1
        else:
            i += 1
    return labels


def _check(tokenizer, out, header, terminator, expected_supervised_tokens):
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # The encoding is the plain tokenization of the rendered text (+ BOS where the text has none).
    tokens = tokenizer.convert_ids_to_tokens(ids)
    reference = _labels_after(tokens, header, terminator)
    assert [bool(m) for m in mask] == reference
    assert [t for t, m in zip(tokens, mask) if m] == expected_supervised_tokens
    labels = [i if m else -100 for i, m in zip(ids, mask)]
    assert labels[0] == -100


def test_vicuna_mask(tokenizers):
    tok = tokenizers["vicuna-v1.5"]
    out = encode_chat(tok, MULTI, "vicuna_v1")
    assert out["text"] == EXPECTED["vicuna_v1"]["multi"]
    ids = out["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and ids.count(1) == 1  # BOS from the tokenizer, once
    assert ids == tok(out["text"]).input_ids
    # "ASSISTANT:" is ▁A SS IST ANT : ; the answer's first token "▁A" carries the separator space.
    _check(tok, out, ["▁A", "SS", "IST", "ANT", ":"], "</s>", ["▁A", "▁cat", ".", "</s>", "▁Black", ".", "</s>"])
    supervised_ids = [i for i, m in zip(ids, out["assistant_masks"]) if m]
    assert supervised_ids == tok.convert_tokens_to_ids(["▁A", "▁cat", ".", "</s>", "▁Black", ".", "</s>"])
    # Nothing of the system prompt, the roles or the questions is supervised.
    unsupervised = tok.decode([i for i, m in zip(ids, out["assistant_masks"]) if not m])
    assert "USER" in unsupervised and "What color is it?" in unsupervised and "polite answers" in unsupervised
    assert "cat" not in unsupervised and "Black" not in unsupervised


def test_vicuna_text_only_and_system_masks(tokenizers):
    tok = tokenizers["vicuna-v1.5"]
    out = encode_chat(tok, TEXT_ONLY, "vicuna_v1")
    _check(tok, out, ["▁A", "SS", "IST", "ANT", ":"], "</s>", ["▁Hi", "▁there", ".", "</s>"])
    out = encode_chat(tok, SYSTEM, "llava_v1")
    assert out["text"] == EXPECTED["llava_v1"]["system"]
    _check(tok, out, ["▁A", "SS", "IST", "ANT", ":"], "</s>", ["▁A", "▁cat", ".", "</s>"])


def test_phi3_mask(tokenizers):
    tok = tokenizers["phi-3.5-mini"]
    out = encode_chat(tok, MULTI, "phi3_instruct")
    assert out["text"] == EXPECTED["phi3_instruct"]["multi"]
    # <|assistant|> and <|end|> are rstrip special tokens: they swallow the following "\n".
    _check(tok, out, ["<|assistant|>"], "<|end|>", ["A", "▁cat", ".", "<|end|>", "Black", ".", "<|end|>"])
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    for special in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert all(not m for t, m in zip(tokens, out["assistant_masks"]) if t == special)
    # This tokenizer adds no BOS (add_bos_token false) and the text has none.
    assert out["input_ids"] == tok(out["text"]).input_ids


def test_llama3_mask_and_bos(tokenizers):
    tok = tokenizers["llama-3.1"]
    out = encode_chat(tok, MULTI, "llama3")
    assert out["text"] == EXPECTED["llama3"]["multi"]
    ids = out["input_ids"]
    # Two BOS by default (LLaVA-pp's input); the text starts with BOS, so the tokenizer adds no third.
    assert ids[:3] == [128000, 128000, 128006] and ids.count(128000) == 2
    _check(
        tok,
        out,
        ["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"],
        "<|eot_id|>",
        ["A", "Ġcat", ".", "<|eot_id|>", "Black", ".", "<|eot_id|>"],
    )


def test_llama3_single_bos_switch(tokenizers):
    tok = tokenizers["llama-3.1"]
    text = render_chat(MULTI, "llama3", double_bos=False)
    assert "<|begin_of_text|>" + text == EXPECTED["llama3"]["multi"]
    assert render_chat(MULTI, "llama3", double_bos=True) == EXPECTED["llama3"]["multi"]
    out = encode_chat(tok, MULTI, "llama3", double_bos=False)
    assert out["input_ids"][:2] == [128000, 128006] and out["input_ids"].count(128000) == 1
    assert sum(out["assistant_masks"]) == 7
    rendered = tok.apply_chat_template(MULTI, chat_template=get_template("llama3"), tokenize=False, double_bos=False)
    assert rendered == text


def test_plain_mask(tokenizers):
    tok = tokenizers["vicuna-v1.5"]
    out = encode_chat(tok, SINGLE, "plain")
    assert out["text"] == "<image>A cat.\n"
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    # <s> ▁< image > | A ▁cat . <0x0A>  (the vicuna tokenizer has no <image> token; BOS and image unsupervised)
    assert tokens == ["<s>", "▁<", "image", ">", "A", "▁cat", ".", "<0x0A>"]
    assert out["assistant_masks"] == [0, 0, 0, 0, 1, 1, 1, 1]


REALISTIC = [(name, "vicuna-v1.5", case) for name in SUPERVISED for case in ("single", "multi")]
REALISTIC = [
    row for row in REALISTIC if row[0] not in ("chatml_direct", "phi3_instruct", "llama3") or row[2] == "single"
]
REALISTIC += [("phi3_instruct", "phi-3.5-mini", "multi"), ("llama3", "llama-3.1", "multi")]


@pytest.mark.parametrize("name, tokenizer, case", REALISTIC)
def test_supervised_text(tokenizers, name, tokenizer, case):
    """The supervised tokens spell exactly the answers + terminators (whitespace aside: SentencePiece's ▁)."""
    tok = tokenizers[tokenizer]
    out = encode_chat(tok, CASES[case], name)
    supervised = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    unsupervised = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if not m])
    assert "".join(supervised.split()) == "".join("".join(SUPERVISED[name][case]).split())
    assert "cat" not in unsupervised and "Black" not in unsupervised


def test_straddling_token_is_supervised(tokenizers):
    """A token shared by the end of an answer and the next turn (here '><' of '<|im_end|><|im_start|>' under a
    tokenizer without ChatML tokens) must be predicted to finish the answer, so it is supervised."""
    tok = tokenizers["vicuna-v1.5"]
    out = encode_chat(tok, MULTI, "chatml_direct")
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    supervised = [t for t, m in zip(tokens, out["assistant_masks"]) if m]
    answer_1 = ["A", "▁cat", ".<", "|", "im", "_", "end", "|", "><"]  # '><' also opens the next <|im_start|>
    answer_2 = ["Black", ".<", "|", "im", "_", "end", "|", ">"]
    assert supervised == answer_1 + answer_2


def test_llava_llama_2_encoding(tokenizers):
    tok = tokenizers["vicuna-v1.5"]
    out = encode_chat(tok, MULTI, "llava_llama_2")
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    # BOS from the tokenizer + the <s> the template writes before the second round
    assert tokens[0] == "<s>" and tokens.count("<s>") == 2 and tokens.count("</s>") == 2
    supervised = [t for t, m in zip(tokens, out["assistant_masks"]) if m]
    assert supervised == ["▁A", "▁cat", ".", "▁", "</s>", "▁Black", ".", "▁", "</s>"]
    second_bos = [i for i, t in enumerate(tokens) if t == "<s>"][1]
    assert out["assistant_masks"][second_bos] == 0
    _check(tok, out, ["▁[", "/", "INST", "]"], "</s>", supervised)


def test_generation_prompt_has_no_supervision(tokenizers):
    out = encode_chat(tokenizers["vicuna-v1.5"], QUESTION, "vicuna_v1", add_generation_prompt=True)
    assert out["text"] == EXPECTED["vicuna_v1"]["prompt"]
    assert sum(out["assistant_masks"]) == 0


def test_template_source_accepted(tokenizers):
    source = get_template("phi3_instruct")
    assert render_chat(MULTI, source) == EXPECTED["phi3_instruct"]["multi"]
    out = encode_chat(tokenizers["phi-3.5-mini"], MULTI, source)
    assert sum(out["assistant_masks"]) == 7


# -------------------------------------------------------------------------------------------- mask failures
def test_unmappable_span_raises():
    text = "ab A cat.</s>"
    # offsets that skip the answer entirely (e.g. a broken/slow tokenizer): must raise, never zero the labels
    with pytest.raises(ValueError, match="Cannot map"):
        supervised_token_mask(text, [(0, 0), (0, 2), (2, 3)], [(3, 13)])
    # partially covered span
    with pytest.raises(ValueError, match="in no token"):
        supervised_token_mask(text, [(0, 2), (2, 5), (5, 9)], [(3, 13)])
    # a token straddling the start of the answer (begins in the prompt, carries answer text) is refused
    with pytest.raises(ValueError, match="straddles"):
        supervised_token_mask(text, [(0, 2), (2, 4), (4, 9), (9, 13)], [(3, 13)])
    # tokens starting inside the span are supervised, one starting before it (even on whitespace) is not
    assert supervised_token_mask(text, [(0, 3), (3, 5), (5, 9), (9, 13)], [(3, 13)]) == [0, 1, 1, 1]
    assert supervised_token_mask(text, [(0, 2), (2, 5), (5, 9), (9, 13)], [(2, 13)]) == [0, 1, 1, 1]
    # image positions are never supervised
    text = "Q: <image>A.</s>"
    assert supervised_token_mask(text, [(0, 3), (3, 10), (10, 12), (12, 16)], [(3, 16)], [1]) == [0, 0, 1, 1]


def test_encode_chat_raises_on_zero_width_offsets(tokenizers):
    class Broken:
        is_fast = True
        bos_token = "<s>"

        def __call__(self, text, add_special_tokens, return_offsets_mapping):
            return {"input_ids": [1] * len(text), "offset_mapping": [(0, 0)] * len(text)}

    with pytest.raises(ValueError, match="Cannot map"):
        encode_chat(Broken(), MULTI, "vicuna_v1")


def test_slow_tokenizer_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        encode_chat(Slow(), MULTI, "vicuna_v1")


def test_lone_space_token_before_a_digit_answer_is_supervised():
    """Vicuna: "ASSISTANT: 7</s>" tokenizes as ":", "▁", "7", "</s>"; LLaVA's instruction_len - 2 rule supervises
    the "▁" (without it a model never learns to open an answer with a digit)."""
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "vicuna-v1.5")
    messages = [
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "A cat."},
    ]
    out = encode_chat(tok, messages, "vicuna_v1")
    supervised = [tok.convert_ids_to_tokens(i) for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert supervised == ["▁", "7", "</s>", "▁A", "▁cat", ".", "</s>"]


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_llama_2"])
def test_templates_saved_by_earlier_versions_are_upgraded(tokenizers, name):
    """Older saved templates had the separator space outside the answer span: same text, same mask once loaded."""
    old = (
        get_template(name)
        .replace(
            "{{- 'ASSISTANT:' -}}\n{%- generation -%}\n{{- ' ' ~ turn(",
            "{{- 'ASSISTANT: ' -}}\n{%- generation -%}\n{{- turn(",
        )
        .replace("{%- generation -%}\n{{- ' ' ~ turn(", "{{- ' ' -}}\n{%- generation -%}\n{{- turn(")
    )
    assert old != get_template(name) and render_chat(MULTI, old) == render_chat(MULTI, name)
    tok = tokenizers["vicuna-v1.5"]
    assert encode_chat(tok, MULTI, old) == encode_chat(tok, MULTI, name)

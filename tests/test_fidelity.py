"""Labels and ids against the original LLaVA / LLaVA-pp preprocessing, on the real tokenizers.

The original rules are re-implemented here, in our own words, from the public training code:

* ``tokenizer_image_token``: every chunk between ``<image>`` placeholders is tokenized with special tokens, the
  leading BOS of every chunk is dropped when the first chunk starts with BOS (one BOS kept in front), and the
  image index is put between the chunks;
* ``Conversation.get_prompt`` of the separator styles TWO (vicuna family), LLAMA_2 (``[INST]``), MPT (chatml,
  phi3, llama3) and PLAIN;
* the label arithmetic of ``preprocess_v1`` / ``preprocess_llama_2`` / ``preprocess_mpt`` (LLaVA),
  ``preprocess_phi3`` / ``preprocess_llama3`` (LLaVA-pp) and ``preprocess_plain``: the text is cut into rounds, each
  round into instruction and answer at the assistant separator, and the instruction's token count (with each
  family's correction: LLaVA's ``-2`` keeps the ``▁`` after ``ASSISTANT:``) is masked. When the counts disagree
  with the real tokenization the original drops every label of the sample ("tokenization mismatch"): those cases
  are reported by :func:`original` as ``None`` and not compared.

``chatml_direct`` (LLaVA-1.6) has no public training code: LLaVA's ``preprocess_mpt`` leaves each round's
``<|im_end|>`` out of its counts and so drops every sample on a tokenizer where that is one special token; it is
checked on its own below (answer + ``<|im_end|>`` supervised, nothing else).

Our side is ``templates.encode_chat`` (what the training collator uses), with the image as one ``-200`` id like the
original, so ids and labels compare position by position.
"""

from __future__ import annotations

import pathlib

import pytest
from transformers import AutoTokenizer

from internvl_chat.templates import drops_leading_assistant, encode_chat

TOKENIZERS = pathlib.Path(__file__).parent / "fixtures" / "tokenizers"
IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
IGNORE = -100

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
    "the visual content that the user provides, and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

# name -> (style, system, (user role, assistant role), sep, sep2)
CONVS = {
    "vicuna_v1": ("two", VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_v1": ("two", LLAVA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "v1_mmtag": ("two", MMTAG_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_llama_2": ("llama_2", LLAMA2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>"),
    "mistral_instruct": ("llama_2", "", ("USER", "ASSISTANT"), "", "</s>"),
    "chatml_direct": (
        "mpt",
        "<|im_start|>system\nAnswer the questions.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>",
        None,
    ),
    "phi3_instruct": (
        "phi3",
        "<|system|>\nYou are a helpful AI assistant.",
        ("\n<|user|>\n", "\n<|assistant|>\n"),
        "<|end|>",
        None,
    ),
    "llama3": (
        "llama3",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + VICUNA_SYSTEM,
        ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "<|eot_id|>",
        None,
    ),
}
TOKENIZER_OF = {
    "vicuna_v1": "vicuna-v1.5",
    "llava_v1": "vicuna-v1.5",
    "v1_mmtag": "vicuna-v1.5",
    "llava_llama_2": "vicuna-v1.5",
    "mistral_instruct": "vicuna-v1.5",
    "chatml_direct": "phi-3.5-mini",
    "phi3_instruct": "phi-3.5-mini",
    "llama3": "llama-3.1",
}


@pytest.fixture(scope="module")
def tokenizers():
    return {
        name: AutoTokenizer.from_pretrained(TOKENIZERS / name) for name in ("vicuna-v1.5", "phi-3.5-mini", "llama-3.1")
    }


# ----------------------------------------------------------------------------------- the original, re-implemented
def image_tokenize(tokenizer, text):
    chunks = [tokenizer(chunk).input_ids for chunk in text.split("<image>")]
    keep_bos = bool(chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id)
    ids = [chunks[0][0]] if keep_bos else []
    skip = 1 if keep_bos else 0
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(IMAGE)
        ids.extend(chunk[skip:])
    return ids


def multimodal(value, name):
    """LLaVA's preprocess_multimodal on one turn: the image goes first, followed by a newline (mmtag: wrapped)."""
    if "<image>" in value:
        value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        if "mmtag" in name:
            value = value.replace("<image>", "<Image><image></Image>")
    return value


def get_prompt(name, turns):
    style, system, roles, sep, sep2 = CONVS[name]
    if style == "two":
        text = system + sep
        for i, (role, value) in enumerate(turns):
            text += roles[role] + ": " + value + (sep if i % 2 == 0 else sep2)
        return text
    if style == "llama_2":
        text = ""
        for i, (_role, value) in enumerate(turns):
            if i == 0 and system:
                value = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + value
            text += sep + f"[INST] {value} [/INST]" if i % 2 == 0 else " " + value + " " + sep2
        return text.lstrip(sep) if sep else text
    text = system + sep
    for role, value in turns:
        text += roles[role] + value + sep
    return text


def original(name, tokenizer, conversation):
    """(ids, labels) of the original preprocessing for [(from, value), ...]; labels None on a count mismatch."""
    has_image = any("<image>" in value for _, value in conversation)
    if name == "plain":
        (_, _), (_, caption) = conversation
        ids = image_tokenize(tokenizer, "<image>" + caption + "\n")
        labels = list(ids)
        labels[: len(image_tokenize(tokenizer, "<image>"))] = [IGNORE] * len(image_tokenize(tokenizer, "<image>"))
        return ids, labels
    if conversation[0][0] != "human":  # "skip the first one if it is not from human"
        conversation = conversation[1:]
    turns = [
        (0 if who == "human" else 1, multimodal(value, name) if has_image else value) for who, value in conversation
    ]
    text = get_prompt(name, turns)

    def n_tokens(piece):
        return len(image_tokenize(tokenizer, piece)) if has_image else len(tokenizer(piece).input_ids)

    ids = image_tokenize(tokenizer, text) if has_image else tokenizer(text).input_ids
    labels = list(ids)
    style, _, roles, sep, sep2 = CONVS[name]
    legacy = getattr(tokenizer, "legacy", None)
    if style in ("two", "llama_2"):
        cut = sep + roles[1] + ": " if style == "two" else "[/INST] "
        rounds = text.split(sep2)
        cur = 1
        labels[:1] = [IGNORE]
        for i, part in enumerate(rounds):
            if part == "":
                break
            pieces = part.split(cut)
            if len(pieces) != 2:
                break
            round_len, instruction_len = n_tokens(part), n_tokens(pieces[0] + cut) - 2
            if style == "two" and i != 0 and not legacy:
                round_len, instruction_len = round_len - 1, instruction_len - 1
            labels[cur : cur + instruction_len] = [IGNORE] * len(labels[cur : cur + instruction_len])
            cur += round_len
    else:
        cut = sep + roles[1]
        rounds = text.split(sep)
        joined = [sep.join(rounds[:3])] + [sep.join(rounds[k : k + 2]) for k in range(3, len(rounds), 2)]
        cur = 0
        for i, part in enumerate(joined):
            if part == "":
                break
            pieces = part.split(cut)
            if len(pieces) != 2:
                break
            round_len, instruction = n_tokens(part), n_tokens(pieces[0] + cut)
            if style == "mpt":
                instruction -= 1
                if i != 0 and legacy:
                    round_len, instruction = round_len + 1, instruction + 1
            elif style == "phi3":
                instruction -= 1
                shift = 1 if i == 0 else -2
                round_len, instruction = round_len + shift, instruction + shift
                if i != 0 and legacy:
                    round_len, instruction = round_len + 1, instruction + 1
            else:  # llama3
                round_len += 1
                if i > 0:
                    round_len, instruction = round_len - 1, instruction - 1
            labels[cur : cur + instruction] = [IGNORE] * len(labels[cur : cur + instruction])
            cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    if cur != len(ids):
        return ids, None  # the original's "tokenization mismatch": every label dropped
    return ids, labels


def ours(name, tokenizer, conversation):
    messages = [{"role": "user" if who == "human" else "assistant", "content": value} for who, value in conversation]
    # No template variable: llama3's default is the original's double BOS.
    out = encode_chat(tokenizer, messages, name, image_token="<image>", image_token_id=IMAGE)
    labels = [t if m else IGNORE for t, m in zip(out["input_ids"], out["assistant_masks"])]
    return out["input_ids"], labels


# ------------------------------------------------------------------------------------------------------ cases
ANSWERS = {
    "plain": "Blue.",
    "leading_space": " Blue.",
    "two_spaces": "  Blue.",
    "leading_newline": "\nBlue",
    "two_newlines": "\n\nBlue",
    "digit": "7 cats.",
    "whitespace_only": " ",
    "newline_only": "\n",
    "trailing_space": "Blue. ",
}


def conversations(answer):
    """The answer in the first, middle and last turn of a three-round conversation, with and without an image."""
    for where in range(3):
        for image in (True, False):
            answers = ["A cat.", "It is black.", "Yes."]
            answers[where] = answer
            first = "<image>\nWhat is in the image?" if image else "What is in the image?"
            yield (
                f"turn{where}-{'image' if image else 'text'}",
                [
                    ("human", first),
                    ("gpt", answers[0]),
                    ("human", "What color is it?"),
                    ("gpt", answers[1]),
                    ("human", "Sure?"),
                    ("gpt", answers[2]),
                ],
            )


COMPARED = [name for name in CONVS if name != "chatml_direct"]


@pytest.mark.parametrize("name", COMPARED)
@pytest.mark.parametrize("answer", list(ANSWERS))
def test_labels_equal_the_original_preprocessing(tokenizers, name, answer):
    tokenizer = tokenizers[TOKENIZER_OF[name]]
    compared = 0
    for case, conversation in conversations(ANSWERS[answer]):
        ids, labels = original(name, tokenizer, conversation)
        our_ids, our_labels = ours(name, tokenizer, conversation)
        assert our_ids == ids, case
        if labels is None:
            continue  # the original dropped the whole sample; ours supervises the answers (see test below)
        compared += 1
        assert our_labels == labels, (case, tokenizer.convert_ids_to_tokens([t for t in labels if t >= 0]))
    assert compared, "every case hit the original's tokenization mismatch: nothing was compared"


@pytest.mark.parametrize("tokenizer_name", ["vicuna-v1.5", "phi-3.5-mini", "llama-3.1"])
@pytest.mark.parametrize("answer", ["Blue.", " A blue bird.", "\nBlue"])
def test_plain_labels_equal_the_original(tokenizers, tokenizer_name, answer):
    tokenizer = tokenizers[tokenizer_name]
    conversation = [("human", "<image>\nDescribe it."), ("gpt", answer)]
    assert ours("plain", tokenizer, conversation) == original("plain", tokenizer, conversation)


@pytest.mark.parametrize("name", [*COMPARED, "plain"])
def test_leading_assistant_turn_is_dropped_like_the_original(tokenizers, name):
    tokenizer = tokenizers[TOKENIZER_OF.get(name, "vicuna-v1.5")]
    tail = [("human", "<image>\nWhat is in the image?"), ("gpt", "A cat.")]
    with_greeting = [("gpt", "Hello! Send me an image."), *tail]
    assert ours(name, tokenizer, with_greeting) == ours(name, tokenizer, tail)
    if name != "plain":  # preprocess_plain asserts two turns, a human one first; the others skip the greeting
        assert ours(name, tokenizer, with_greeting) == original(name, tokenizer, with_greeting)
    messages = [{"role": r, "content": c} for r, c in (("assistant", "Hi"), ("user", "Q"), ("assistant", "A"))]
    assert drops_leading_assistant(messages)
    assert drops_leading_assistant([{"role": "system", "content": "S"}, *messages])
    assert not drops_leading_assistant(messages[1:])
    assert not drops_leading_assistant([])


def test_prompt_tokens_swallowing_answer_whitespace_are_not_supervised(tokenizers):
    """The two leaks found: phi3's `<|assistant|>` (rstrip eats the answer's leading space / newline) and llama3's
    merged `ĊĊĊ` (header `\\n\\n` + the answer's `\\n`) start in the prompt, so they are prompt tokens."""
    phi3 = tokenizers["phi-3.5-mini"]
    assistant = phi3.convert_tokens_to_ids("<|assistant|>")
    for answer in (" Blue.", "\nBlue", " "):
        ids, labels = ours("phi3_instruct", phi3, [("human", "Q?"), ("gpt", answer), ("human", "Q2"), ("gpt", "A")])
        assert assistant in ids and assistant not in labels, answer
    llama = tokenizers["llama-3.1"]
    ids, labels = ours("llama3", llama, [("human", "Q?"), ("gpt", "\nBlue")])
    merged = llama.convert_tokens_to_ids("ĊĊĊ")
    assert merged in ids and merged not in labels
    assert llama.convert_tokens_to_ids("Blue") in labels


def test_separator_space_before_a_digit_is_supervised(tokenizers):
    """LLaVA's `-2`: after `ASSISTANT:` a lone `▁` (a digit never merges with it) is the answer's first target."""
    tok = tokenizers["vicuna-v1.5"]
    ids, labels = ours("vicuna_v1", tok, [("human", "How many?"), ("gpt", "7 cats.")])
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert tok.convert_ids_to_tokens(ids[first - 1 : first + 2]) == [":", "▁", "7"]


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_chatml_direct_supervises_each_answer_and_its_end(tokenizers, answer):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "llama-3.1", add_bos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tail = [("human", "<image>\nWhat is in the image?"), ("gpt", "A cat."), ("human", "Sure?"), ("gpt", answer)]
    ids, labels = ours("chatml_direct", tokenizer, [("gpt", "Hi."), *tail])
    assert (ids, labels) == ours("chatml_direct", tokenizer, tail)  # the greeting is dropped
    supervised = tokenizer.decode([t for t in labels if t != IGNORE])
    expected = "A cat.<|im_end|>" + answer + "<|im_end|>"
    # Tokens that start in the prompt carry no answer text here (the header ends with a newline of its own).
    assert supervised == expected or supervised.replace("\n", "") == expected.replace("\n", ""), supervised
    assert IMAGE not in labels and labels[0] == IGNORE


# ------------------------------------------------------------------------------ a user's own TRL script
TRL_MODELS = [
    ("vicuna-v1.5", "llava-v1.5-7b"),
    ("phi-3.5-mini", "llavar2-phi3.5-mini"),
    ("llama-3.1", "llavar2-llama3.1-8b"),
]


def picture(seed=0):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((40, 64, 3)) * 255).astype("uint8"))


def chat(*turns):
    """HF messages in TRL's vision form (content as blocks); `None` is an image block of the first user turn."""
    messages = []
    for k, text in enumerate(turns):
        blocks = [{"type": "text", "text": text}]
        if k == 0:
            blocks.insert(0, {"type": "image"})
        messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": blocks})
    return messages


@pytest.mark.parametrize("tokenizer_name, preset", TRL_MODELS)
def test_trl_assistant_only_loss_supervises_exactly_our_tokens(tokenizer_name, preset):
    """TRL's vision collator with assistant_only_loss=True (processor.apply_chat_template with
    return_assistant_tokens_mask) gives the ids and labels of our own sample encoding, padding aside."""
    import copy

    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from internvl_chat.factories import build_processor, prepare_tokenizer

    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / tokenizer_name), 4096)
    processor = build_processor(preset, tokenizer, 4, tiny=True)
    examples = [
        {"messages": chat("What is it?", " Blue.", "Sure?", "\nYes"), "images": [picture(0)]},
        {"messages": chat("What is it?", "Hi", "More?", " "), "images": [picture(1)]},
        {"messages": chat("Color?", "7 cats."), "images": [picture(2)]},
    ]
    collator = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True, max_length=None)
    batch = collator(copy.deepcopy(examples))
    for row, example in enumerate(examples):
        ours = encode_chat(
            tokenizer,
            example["messages"],
            processor.chat_template,
            image_token=processor.image_token,
            image_seq_length=processor.image_seq_length,
            image_token_id=processor.image_token_id,
        )
        n = len(ours["input_ids"])
        assert int(batch["attention_mask"][row].sum()) == n
        assert batch["input_ids"][row, :n].tolist() == ours["input_ids"]
        labels = [t if m else IGNORE for t, m in zip(ours["input_ids"], ours["assistant_masks"])]
        assert batch["labels"][row, :n].tolist() == labels, row
        assert (batch["labels"][row, n:] == IGNORE).all()


@pytest.mark.parametrize("tokenizer_name, preset", TRL_MODELS)
def test_trl_prompt_completion_format_works(tokenizer_name, preset):
    import copy

    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from internvl_chat.factories import build_processor, prepare_tokenizer

    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / tokenizer_name), 4096)
    processor = build_processor(preset, tokenizer, 4, tiny=True)
    messages = chat("What is it?", "A cat.")
    example = {"prompt": messages[:1], "completion": messages[1:], "images": [picture()]}
    batch = DataCollatorForVisionLanguageModeling(processor=processor, max_length=None, completion_only_loss=True)(
        [copy.deepcopy(example)]
    )
    stop = {"vicuna-v1.5": "</s>", "phi-3.5-mini": "<|end|>", "llama-3.1": "<|eot_id|>"}[tokenizer_name]
    assert tokenizer.decode([t for t in batch["labels"][0].tolist() if t != IGNORE]) == "A cat." + stop
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == 4 and batch["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_trl_sft_trainer_never_learns_the_image_token(tmp_path, assistant_only_loss):
    """A user's SFTTrainer script on our model: TRL's default collator copies input_ids (16 image tokens a sample)
    into the labels; the model ignores those positions like LLaVA, so after 5 steps at a high learning rate no
    text position predicts `<image>` (without the rule: about a third of them). assistant_only_loss=True runs too."""
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from internvl_chat.factories import create

    model, processor, _ = create(
        "llava-v1.5-7b", None, tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True, dtype="float32"
    )
    rows = [{"messages": chat("What is it?", "A red square."), "images": [picture(i)]} for i in range(8)]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_length=None,
        assistant_only_loss=assistant_only_loss,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor
    )
    trainer.train()
    batch = trainer.data_collator([dict(row) for row in rows[:2]])
    image_id = model.config.image_token_id
    with torch.no_grad():
        logits = model.eval()(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
    text = (batch["input_ids"][:, 1:] != image_id) & (batch["attention_mask"][:, 1:] == 1)
    assert text.sum() > 0 and not (logits[:, :-1].argmax(-1)[text] == image_id).any()

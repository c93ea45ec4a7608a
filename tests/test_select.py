"""Data selection (issues 7, 22): IFD / VFD / mIFD / FFD per QA pair and per duo against losses computed by hand,
the published scripts' span logic against ours on the three real tokenizers, Cherry-LLM's selection rule,
conversation rewriting, resumption, bad images, and `internvl-chat select` end to end on tiny models.

The hand computation is independent of the scorer: each conversation is written out here, rendered with the
template and tokenized by the *processor* (the inference path), the scored span located the way the published
scripts do it -- by counting the tokens of the text before the span (Cherry-LLM's ``len(tokenizer.encode(text[:
start]))``, LLaVAR-2's prefix lengths) -- and the loss taken from the full logits of an unpadded single forward.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from conftest import TOKENIZERS
from internvl_chat.data.scoring import (
    LOSSES,
    METRICS,
    ConditionalLossScorer,
    TextRenderer,
    build_unit_conversation,
    compute_metric,
    read_scores,
)
from internvl_chat.data.select import METRIC_NAMES, keep_turns, select_indices
from internvl_chat.data.select import main as select_main
from internvl_chat.templates import render_chat

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
# A text-only model's own chat template (Phi-3-mini's): it closes a conversation without a generation prompt with
# the eos token, so the assistant header must be found without it.
PHI3_MINI_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from internvl_chat.factories import create

    out = tmp_path_factory.mktemp("tiny-model")
    model, processor, _ = create("llava-v1.5-7b", str(out), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    return model.eval(), processor, out


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory):
    """A tiny text-only Llama with the vicuna tokenizer and Phi-3-mini's chat template (saved as a folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "vicuna-v1.5")
    tokenizer.chat_template = PHI3_MINI_TEMPLATE
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("text-lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer, out


def _image(seed: int, size=(40, 52)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype("uint8"))


def _msg(role, text, image=False):
    blocks = [{"type": "image"}] if image else []
    return {"role": role, "content": [*blocks, {"type": "text", "text": text}]}


# (question, answer) turns; the first question of an image sample carries the image.
SAMPLES = {
    "single": [("What is in the picture?", "A red square on grass.")],
    "multi": [
        ("What colour is the car?", "Blue."),
        ("Where is it parked?", "Next to a bakery on a narrow street."),
        ("Is anyone inside?", "No, it is empty."),
    ],
    "duos": [
        ("What is written on the sign?", "STOP"),
        ("Why is it written there?", "Because cars must stop at the crossing."),
        ("What number is on the door?", "42"),
        ("How do you know it is a house number?", "It is on a plate next to the door, as house numbers are."),
    ],
    "text": [("Name a fruit.", "An apple, which is red.")],
}


def _sample(name, seed=0):
    turns = []
    for k, (q, a) in enumerate(SAMPLES[name]):
        image = name != "text" and k == 0
        turns += [_msg("user", ("\n" if image else "") + q, image), _msg("assistant", a)]
    images = [] if name == "text" else [_image(seed)]
    return {"id": name, "messages": turns, "images": images, "source": "fixture"}


def _samples():
    return [_sample(name, i) for i, name in enumerate(SAMPLES)]


# -------------------------------------------------------------------------------------------- by hand
def _hand_loss(model, processor, text, images, start, end=None):
    """Mean CE of the tokens from the one after ``text[:start]`` to the one of ``text[:end]`` (``None``: to the
    end of the sequence), counting tokens of text prefixes as the published scripts do."""

    def ids_of(t):
        n = t.count("<image>")
        kwargs = {"images": images[:n]} if n else {}
        return processor(text=t, return_tensors="pt", **kwargs)["input_ids"][0]

    n = text.count("<image>")
    enc = processor(text=text, return_tensors="pt", **({"images": images[:n]} if n else {}))
    ids = enc["input_ids"][0]
    first = len(ids_of(text[:start]))
    last = len(ids) if end is None else len(ids_of(text[:end]))
    assert torch.equal(ids[:first], ids_of(text[:start]))  # the prefix tokenizes to a prefix of the whole
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    losses = [-logp[p - 1, ids[p]].item() for p in range(first, last)]
    return sum(losses) / len(losses), last - first


def _vicuna(turns):
    """Our vicuna_v1 text, written out: system, then 'USER: q ASSISTANT: a</s>' per pair."""
    out = SYSTEM + " "
    for q, a in turns:
        out += f"USER: {q} " + (f"ASSISTANT: {a}</s>" if a is not None else "ASSISTANT:")
    return out


def _hand_unit_losses(model, processor, sample, qa_id, unit):
    """Every loss of one unit, by hand (vicuna_v1; text losses with the vision model's LM, no image)."""
    qa = SAMPLES[sample["id"]]
    images = sample["images"]
    img = "<image>\n" if images else ""
    out = {}
    q, a = qa[qa_id // 2]
    if unit == "pair":
        # IFD (text, no image): the answer after the prompt / after the bare header; no terminator (Cherry)
        full = _vicuna([(q, a)])
        start = len(_vicuna([(q, None)]))  # "...ASSISTANT:" -- the separating space goes with the answer
        out["a|q"] = _hand_loss(model, processor, full, [], start, start + 1 + len(a))
        bare = f"ASSISTANT: {a}</s>"  # no system preamble
        out["a"] = _hand_loss(model, processor, bare, [], len("ASSISTANT:"), len(bare) - len("</s>"))
        if images:
            # VFD (vision): from the question's first token to the end of the turn, with / without the image
            full = _vicuna([(img + q, a)])
            out["qa|i"] = _hand_loss(model, processor, full, images, full.index(img + q) + len(img))
            full = _vicuna([(q, a)])
            out["qa"] = _hand_loss(model, processor, full, images, full.index("USER: " + q) + len("USER:"))
        return out
    (q1, a1), (q2, a2) = qa[qa_id // 2], qa[qa_id // 2 + 1]
    full = _vicuna([(img + q1, a1), (q2, a2)])
    out["qa2|i,qa1"] = _hand_loss(model, processor, full, images, full.rindex("USER: " + q2) + len("USER:"))
    full = _vicuna([(img + q2, a2)])
    out["qa2|i"] = _hand_loss(model, processor, full, images, full.index(img + q2) + len(img))
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_every_loss_of_every_pair_and_duo_equals_the_hand_computation(tiny, padding_side):
    model, processor, _ = tiny
    samples = _samples()
    scorer = ConditionalLossScorer(model, processor, batch_size=3, padding_side=padding_side, show_progress=False)
    records = scorer.score(samples, list(LOSSES))
    expected_units = {
        "single": [("pair", 0), ("duo", 0)],
        "multi": [("pair", 0), ("pair", 2), ("pair", 4), ("duo", 0), ("duo", 4)],
        "duos": [("pair", 0), ("pair", 2), ("pair", 4), ("pair", 6), ("duo", 0), ("duo", 4)],
        "text": [("pair", 0), ("duo", 0)],
    }
    for sample in samples:
        record = records[sample["id"]]
        assert record["status"] == "ok"
        units = {(u["unit"], u["qa_id"]): u for u in record["units"]}
        assert sorted(units) == sorted(expected_units[sample["id"]])
        for (kind, qa_id), unit in units.items():
            if kind == "duo" and (sample["id"], qa_id) in {("single", 0), ("text", 0), ("multi", 4)}:
                assert unit["status"] == "error" and unit["reason"] == "not_duo"  # 2 turns (left), not 4
                continue
            hand = _hand_unit_losses(model, processor, sample, qa_id, kind)
            assert unit["status"] == "ok"
            for name, (value, n_tokens) in hand.items():
                assert unit["loss"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (sample["id"], qa_id, name)
                assert unit["tokens"][name] == n_tokens, (sample["id"], qa_id, name)
            if sample["id"] == "text":
                assert "qa|i" not in unit["loss"] and unit["skipped"] == {"qa|i": "no_image"}  # VFD needs an image
            # the metrics, from the hand-computed losses
            s = {name: value for name, (value, _) in hand.items()}
            if kind == "pair":
                assert compute_metric(unit, "ifd")[0] == pytest.approx(s["a|q"] / s["a"], rel=1e-5)
                if "qa|i" in s:
                    vfd = s["qa|i"] / s["qa"]
                    assert compute_metric(unit, "vfd")[0] == pytest.approx(vfd, rel=1e-5)
                    assert compute_metric(unit, "mifd")[0] == pytest.approx(vfd * s["a|q"] / s["a"], rel=1e-5)
            else:
                assert compute_metric(unit, "ffd")[0] == pytest.approx(s["qa2|i,qa1"] / s["qa2|i"], rel=1e-5)
    assert compute_metric(records["text"]["units"][0], "vfd") == (None, "no_image")
    assert compute_metric(records["text"]["units"][0], "mifd") == (None, "no_image")


def test_two_model_mifd_uses_the_text_model_for_ifd(tiny, text_lm):
    """mIFD = VFD (vision model) × IFD (a text-only LM with its own chat template), each factor by hand."""
    model, processor, _ = tiny
    text_model, tokenizer, _ = text_lm
    sample = _sample("multi")
    scorer = ConditionalLossScorer(
        model,
        processor,
        text_model=text_model,
        text_tokenizer=tokenizer,
        text_model_name="tiny-text",
        show_progress=False,
    )
    assert scorer.renderers["text"].header == "<|assistant|>\n"
    record = scorer.score([sample], "mifd")["multi"]
    assert record["config"]["a|q"]["model"] == "tiny-text" and record["config"]["qa|i"]["model"] != "tiny-text"

    def text_loss(text, start, end):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        first, last = len(tokenizer(text[:start])["input_ids"]), len(tokenizer(text[:end])["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(text_model(ids).logits[0].float(), -1)
        return sum(-logp[p - 1, ids[0, p]].item() for p in range(first, last)) / (last - first)

    for unit, (q, a) in zip(record["units"], SAMPLES["multi"]):
        prompt = f"<|user|>\n{q}<|end|>\n<|assistant|>\n"
        cond = text_loss(prompt + a + "<|end|>\n</s>", len(prompt), len(prompt) + len(a))
        alone = text_loss(f"<|assistant|>\n{a}<|end|>\n</s>", len("<|assistant|>\n"), len("<|assistant|>\n" + a))
        assert unit["loss"]["a|q"] == pytest.approx(cond, rel=1e-5)
        assert unit["loss"]["a"] == pytest.approx(alone, rel=1e-5)
        hand = _hand_unit_losses(model, processor, sample, unit["qa_id"], "pair")
        vfd = hand["qa|i"][0] / hand["qa"][0]
        assert compute_metric(unit, "mifd")[0] == pytest.approx(vfd * cond / alone, rel=1e-5)


# ------------------------------------------------------------------------------- published span logic
def _published_span(tokenizer, template, loss, sample, qa_id, seq_len=3):
    """The scored token range as the published scripts compute it, restated for our templates:

    * IFD (Cherry-LLM, and LLaVAR-2's IFD.py as intended): from the token count of the prompt (up to the assistant
      header) to the token count of prompt + answer -- no terminator; the answer-alone text is BOS + the bare
      assistant header + the answer, no system preamble.
    * VFD / FFD (LLaVAR-2's VFD.py / FFD.py): from the token count of everything before the (second) question --
      conversation, image placeholders and the newline after them -- to the end of the sequence.

    Token counts are LLaVA's image-aware tokenization: the text cut at ``<image>``, each piece tokenized on its own
    (BOS with the first unless the text starts with it), ``seq_len`` ids per image.
    """
    bos = tokenizer.bos_token

    def count(text):
        pieces = text.split("<image>")
        n = (len(pieces) - 1) * seq_len
        for j, piece in enumerate(pieces):
            special = j == 0 and not text.startswith(bos)
            if piece or special:
                n += len(tokenizer(piece, add_special_tokens=special)["input_ids"])
        return n

    messages, _, question, answer = build_unit_conversation(sample, qa_id, loss)
    full = render_chat(messages, template)
    prompt = render_chat(messages[:-1], template, add_generation_prompt=True)
    a_end = full.index(answer, len(prompt)) + len(answer)
    if loss == "a|q":
        return count(prompt), count(full[:a_end])
    if loss == "a":
        header = prompt[len(render_chat(messages[:-1], template)) :].lstrip()
        lead = ""
        while full.startswith(lead + bos):  # the BOS the template writes (llama3: twice) stays
            lead += bos
        bare = lead + header + full[len(prompt) : a_end]
        return count(lead + header), count(bare)
    q_start = full.rindex(question, 0, len(prompt))
    return count(full[:q_start].rstrip(" ")), count(full)


@pytest.mark.parametrize(
    "folder, template", [("vicuna-v1.5", "vicuna_v1"), ("phi-3.5-mini", "phi3_instruct"), ("llama-3.1", "llama3")]
)
def test_published_span_logic_equals_ours_on_real_tokenizers(folder, template):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / folder)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    renderer = TextRenderer(
        tokenizer,
        template,
        image_token="<image>",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=3,
    )
    samples = [_sample("duos"), _sample("multi")]
    # answers that start with a digit / a space, a system message of the sample
    samples.append(
        {
            "id": "edge",
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                _msg("user", "<image>\nHow many cars?", False),
                _msg("assistant", "7"),
                _msg("user", "And bikes?"),
                _msg("assistant", " Two, both red."),
            ],
            "images": ["x.png"],
        }
    )
    checked = 0
    for sample in samples:
        n_turns = len([m for m in sample["messages"] if m["role"] != "system"])
        for name, spec in LOSSES.items():
            starts = range(0, n_turns, 2) if spec.unit == "pair" else range(0, n_turns - 3, 4)
            for qa_id in starts:
                messages, n_images, question, answer = build_unit_conversation(sample, qa_id, name)
                text, start, end = renderer.span(messages, spec.span, question, answer, spec.terminator)
                _, mask, _ = renderer.encode(text, start, end)
                ours = [i for i, m in enumerate(mask) if m]
                first, last = _published_span(tokenizer, template, name, sample, qa_id)
                assert ours == list(range(first, last)), (folder, sample["id"], name, qa_id)
                checked += 1
    assert checked == (4 + 3 + 2) * 4 + (2 + 1 + 1) * 2  # pairs × pair losses + duos × duo losses


# ------------------------------------------------------------------------------------------ selection rule
def test_cherry_selection_rule():
    values = {0: 0.5, 1: 1.2, 2: 0.9, 3: None, 4: 0.7, 5: 0.95, 6: 1.0}
    kept, dropped = select_indices(values, keep=0.5, reasons={3: "corrupt_image"})
    # ratio > 1 dropped first (1.0 stays); 5 remain, int(5 × 0.5) = 2 highest kept, in file order
    assert kept == [5, 6]
    assert dropped == {1: "ratio_gt_max", 3: "corrupt_image", 0: "not_in_top", 2: "not_in_top", 4: "not_in_top"}
    assert select_indices(values, threshold=0.9)[0] == [2, 5, 6]
    assert select_indices(values, keep=3)[0] == [2, 5, 6]
    assert select_indices(values, keep=1.0)[0] == [0, 2, 4, 5, 6]
    assert select_indices(values, keep=0.5, max_ratio=None)[0] == [1, 5, 6]
    # ties at the cut: Cherry sorts (value, index) and keeps the tail, so the later index wins
    assert select_indices({0: 0.8, 1: 0.8, 2: 0.8, 3: 0.1}, keep=2)[0] == [1, 2]
    assert select_indices({(0, 2): 0.8, (1, 0): 0.8, (0, 0): 0.8}, keep=0.34)[0] == [(1, 0)]
    # a fraction that rounds to zero keeps everything (Cherry's list[-0:])
    assert select_indices({0: 0.2, 1: 0.3, 2: 1.5}, keep=0.1)[0] == [0, 1]
    # the other end of the ranking (an option, unverified for LLaVAR-2)
    assert select_indices(values, keep=0.5, order="lowest")[0] == [0, 4]


def test_keep_turns_moves_the_image_of_a_dropped_pair():
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "Outside."},
        {"from": "human", "value": "Who?"},
        {"from": "gpt", "value": "Nobody."},
    ]
    out = keep_turns(turns, {2, 3}, "from", "value", "system")
    assert [t["value"] for t in out] == ["Be brief.", "<image>\nWhere?", "Outside."]
    out = keep_turns(turns, {0, 1, 4, 5}, "from", "value", "system")
    assert [t["value"] for t in out] == ["Be brief.", "<image>\nWhat colour?", "Blue.", "Who?", "Nobody."]
    messages = [_msg("user", "\nQ1", True), _msg("assistant", "A1"), _msg("user", "Q2"), _msg("assistant", "A2")]
    out = keep_turns(messages, {2, 3}, "role", "content", "system")
    assert out[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q2"}] and len(out) == 2
    assert turns[1]["value"] == "<image>\nWhat colour?"  # the input is not modified


def test_metric_registry():
    assert METRIC_NAMES == tuple(sorted(METRICS))
    unit = {"unit": "pair", "status": "ok", "loss": {"a|q": 1.0, "a": 2.0, "qa|i": 0.5, "qa": 1.0}}
    assert compute_metric(unit, "ifd") == (0.5, None)
    assert compute_metric(unit, "vfd") == (0.5, None)
    assert compute_metric(unit, "mifd") == (0.25, None)
    assert compute_metric(unit, "ffd") == (None, "missing_loss")  # a pair is not a duo
    duo = {"unit": "duo", "status": "ok", "loss": {"qa2|i,qa1": 0.25, "qa2|i": 1.0}}
    assert compute_metric(duo, "ffd") == (0.25, None)
    assert compute_metric({"unit": "duo", "status": "error", "reason": "not_duo"}, "ffd") == (None, "not_duo")
    assert compute_metric({**unit, "loss": {**unit["loss"], "a": 0.0}}, "ifd") == (None, "zero_loss")
    assert METRICS["ifd"].rule_verified and not any(METRICS[m].rule_verified for m in ("vfd", "mifd", "ffd"))


# ---------------------------------------------------------------------------------------- files and CLI
def _write_fixture(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        _image(i).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    qa = [
        "What shape is shown?",
        "Describe the colours.",
        "Is there any text?",
        "How many objects are there?",
        "What is the background?",
    ]
    answers = [
        "A square in the middle of the picture.",
        "Mostly red and green, with a little blue near the corner.",
        "No, the image holds no text at all.",
        "There are three objects.",
        "A plain grey wall behind the objects.",
    ]
    records = [
        {
            "id": f"s{i}",
            "image": f"img{i}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            "extra_field": i,  # written back verbatim
        }
        for i, (q, a) in enumerate(zip(qa, answers))
    ]
    # a multi-turn sample: its pairs are scored and selected one by one
    records[2]["conversations"] += [
        {"from": "human", "value": "Which colour is brightest?"},
        {"from": "gpt", "value": "The red one, by far."},
        {"from": "human", "value": "Is it a photo?"},
        {"from": "gpt", "value": "It looks like a rendering."},
    ]
    records.append(
        {
            "id": "bad",
            "image": "broken.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}],
        }
    )
    records.append(
        {
            "id": "gone",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}],
        }
    )
    records.append({"id": "malformed", "conversations": [{"from": "robot", "value": "?"}]})
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    return data, records


def test_resume_gives_same_scores_and_bad_images_are_reported(tiny, tmp_path):
    from internvl_chat.data import read_samples

    model, processor, _ = tiny
    data, _ = _write_fixture(tmp_path / "data")
    samples = read_samples(data, image_folder=tmp_path / "data", on_error="skip")
    full = ConditionalLossScorer(model, processor, batch_size=4, show_progress=False).score(
        samples, "mifd", scores_path=tmp_path / "full.jsonl"
    )
    path = tmp_path / "resumed.jsonl"
    first = ConditionalLossScorer(model, processor, batch_size=2, chunk_size=3, show_progress=False)
    first.score(samples, "mifd", scores_path=path, limit=1)  # "killed" after the first chunk
    assert len(read_scores(path)) == 3
    with open(path, "a") as f:
        f.write('{"key": "s4", "sta')  # a torn last line from the kill is ignored
    second = ConditionalLossScorer(model, processor, batch_size=2, chunk_size=3, show_progress=False)
    resumed = second.score(samples, "mifd", scores_path=path)
    assert second.stats["scored"] == 2  # s3 and s4; nothing of the first chunk again (bad ones are retried)
    assert resumed.keys() == full.keys()
    for key, record in full.items():
        assert resumed[key]["status"] == record["status"]
        if record["status"] == "ok":
            for unit, other in zip(record["units"], resumed[key]["units"]):
                assert other["loss"] == pytest.approx(unit["loss"], rel=1e-5)
    assert [u["qa_id"] for u in full["s2"]["units"]] == [0, 2, 4]
    assert full["bad"]["status"] == "error" and full["bad"]["reason"] == "corrupt_image"
    assert full["gone"]["reason"] == "missing_image"
    assert second.stats["corrupt_image"] == 1 and second.stats["missing_image"] == 1
    third = ConditionalLossScorer(model, processor, show_progress=False)
    third.score(samples, "mifd", scores_path=path)
    assert third.stats["scored"] == 0 and third.stats["corrupt_image"] == 1
    # another text model invalidates the IFD losses only: the samples are rescored; FFD is added, mIFD's kept
    fourth = ConditionalLossScorer(model, processor, text_model_name="other", show_progress=False)
    fourth.score(samples, "ifd", scores_path=path)
    assert fourth.stats["scored"] == 7  # IFD is text-only: the samples with a bad image get one too
    ffd = ConditionalLossScorer(model, processor, show_progress=False)
    merged = ffd.score(samples, "ffd", scores_path=path)
    s2 = {(u["unit"], u["qa_id"]): u for u in merged["s2"]["units"]}
    assert set(s2) == {("pair", 0), ("pair", 2), ("pair", 4), ("duo", 0), ("duo", 4)}
    assert s2[("duo", 0)]["status"] == "ok" and s2[("duo", 4)]["reason"] == "not_duo"
    assert set(s2[("pair", 2)]["loss"]) == {"qa|i", "qa", "a|q", "a"}


def test_select_cli_end_to_end(tiny, text_lm, tmp_path, capsys):
    _, _, model_dir = tiny
    _, _, text_dir = text_lm
    data, records = _write_fixture(tmp_path / "data")
    out = tmp_path / "out" / "selected.json"
    argv = [str(data), "--model", str(model_dir), "--metric", "mifd", "--keep", "0.5", "--output", str(out)]
    argv += ["--image-folder", str(tmp_path / "data"), "--batch-size", "4", "--text-model", str(text_dir)]
    assert select_main(argv) == 0
    summary = json.loads((tmp_path / "out" / "selected.summary.json").read_text())
    assert json.loads(capsys.readouterr().out)["kept"] == summary["kept"]
    scores = read_scores(tmp_path / "out" / "selected.scores.jsonl")
    # expected kept pairs from the stored losses with the formula written out here, Cherry's rule
    mifd = {}
    for i, record in enumerate(records[:5]):
        for unit in scores[record["id"]]["units"]:
            s = unit["loss"]
            mifd[(i, unit["qa_id"])] = s["qa|i"] / s["qa"] * s["a|q"] / s["a"]
    assert len(mifd) == 7
    valid = sorted((v, k) for k, v in mifd.items() if v <= 1)
    top = {k for _, k in valid[-int(len(valid) * 0.5) :]} if int(len(valid) * 0.5) else {k for _, k in valid}
    expected = []
    for i, record in enumerate(records[:5]):
        pairs = sorted(q for j, q in top if j == i)
        if not pairs:
            continue
        conv = record["conversations"]
        if len(pairs) < len(conv) // 2:
            kept_turns = [t for q in pairs for t in conv[q : q + 2]]
            if 0 not in pairs:  # the image moves to the first kept question
                kept_turns[0] = {**kept_turns[0], "value": "<image>\n" + kept_turns[0]["value"]}
            record = {**record, "conversations": kept_turns}
        expected.append(record)
    assert json.loads(out.read_text()) == expected  # verbatim records (extra_field kept), file order
    assert summary["kept"] == len(expected) and summary["kept_pairs"] == len(top)
    reasons = summary["dropped_by_reason"]
    assert reasons["corrupt_image"] == 1 and reasons["missing_image"] == 1 and reasons["malformed_unknown_role"] == 1
    assert reasons.get("ratio_gt_max", 0) == len(mifd) - len(valid)
    assert summary["definition"]["expression"].startswith("mIFD = VFD × IFD")
    assert set(summary["definition"]["losses"]) == {"qa|i", "qa", "a|q", "a"}
    assert summary["models"] == {"vision": [str(model_dir)], "text": [str(text_dir)]}
    assert summary["rule"]["order"] == "highest" and summary["rule"]["select"] == "pairs"
    assert not summary["rule"]["published"] and "unverified" in summary["rule"]["note"]
    assert (tmp_path / "out" / "selected.hist.png").read_bytes()[:4] == b"\x89PNG"

    # parquet input, no model: re-select whole samples from the stored scores with another metric
    from internvl_chat.data import convert

    parquet = tmp_path / "data.parquet"
    convert(data, parquet, to="parquet", on_error="skip")
    out2 = tmp_path / "out2" / "sel.parquet"
    scores_file = tmp_path / "out" / "selected.scores.jsonl"
    argv2 = [str(parquet), "--metric", "vfd", "--threshold", "0", "--scores", str(scores_file), "--output", str(out2)]
    assert select_main([*argv2, "--select", "samples"]) == 0
    import datasets

    rows = datasets.Dataset.from_parquet(str(out2))
    vfd = {}
    for record in records[:5]:
        units = scores[record["id"]]["units"]
        vfd[record["id"]] = sum(u["loss"]["qa|i"] / u["loss"]["qa"] for u in units) / len(units)
    assert sorted(rows["id"]) == sorted(k for k, v in vfd.items() if v <= 1)
    assert all(not math.isnan(v) for v in vfd.values())
    summary2 = json.loads((tmp_path / "out2" / "sel.summary.json").read_text())
    assert summary2["models"] == {"vision": [str(model_dir)]} and summary2["rule"]["select"] == "samples"


def test_ffd_selection_keeps_duos(tiny, tmp_path):
    _, _, model_dir = tiny
    folder = tmp_path / "data"
    folder.mkdir()
    _image(0).save(folder / "a.png")
    turns = [t for q, a in SAMPLES["duos"] for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    turns[0]["value"] = "<image>\n" + turns[0]["value"]
    records = [{"id": "d", "image": "a.png", "conversations": turns}]
    (folder / "d.json").write_text(json.dumps(records))
    out = tmp_path / "ffd.json"
    argv = [str(folder / "d.json"), "--image-folder", str(folder), "--model", str(model_dir), "--metric", "ffd"]
    assert select_main([*argv, "--keep", "0.5", "--max-ratio", "inf", "--order", "lowest", "--output", str(out)]) == 0
    scores = read_scores(tmp_path / "ffd.scores.jsonl")["d"]["units"]
    ffd = {u["qa_id"]: u["loss"]["qa2|i,qa1"] / u["loss"]["qa2|i"] for u in scores}
    (best,) = [q for q in ffd if ffd[q] == min(ffd.values())]
    kept = json.loads(out.read_text())[0]["conversations"]
    expected = turns[best : best + 4]
    if best:
        expected[0] = {**expected[0], "value": "<image>\n" + expected[0]["value"]}
    assert kept == expected
    summary = json.loads((tmp_path / "ffd.summary.json").read_text())
    assert summary["kept_duos"] == 1 and summary["scored_duos"] == 2 and summary["rule"]["max_ratio"] is None


@pytest.mark.slow
def test_select_two_processes_matches_one(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo): each scores its share, the parts are merged, same selection."""
    import os
    import subprocess
    import sys

    _, _, model_dir = tiny
    data, _ = _write_fixture(tmp_path / "data")
    common = [str(data), "--image-folder", str(tmp_path / "data"), "--model", str(model_dir), "--metric", "mifd"]
    assert select_main([*common, "--keep", "0.5", "--output", str(tmp_path / "one" / "sel.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "internvl_chat.data.select"]
    out = tmp_path / "two" / "sel.json"
    subprocess.run([*cmd, *common, "--keep", "0.5", "--output", str(out)], check=True, env=env, timeout=300)
    one = read_scores(tmp_path / "one" / "sel.scores.jsonl")
    two = read_scores(tmp_path / "two" / "sel.scores.jsonl", include_parts=False)
    assert not list((tmp_path / "two").glob("*.rank*")) and one.keys() == two.keys()
    for key, record in one.items():
        if record["status"] == "ok":
            for unit, other in zip(record["units"], two[key]["units"]):
                assert other["loss"] == pytest.approx(unit["loss"], rel=1e-5)
    assert json.loads(out.read_text()) == json.loads((tmp_path / "one" / "sel.json").read_text())
    summary = json.loads((tmp_path / "two" / "sel.summary.json").read_text())
    assert summary["scorer"] == {"scored": 5, "units": 7, "corrupt_image": 1, "missing_image": 1}

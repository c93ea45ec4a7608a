"""Data selection (issue 7): the conditional-loss scorer against hand-computed cross-entropies, the metric formulas
and Cherry-LLM's selection rules, resumption, bad images, and `internvl-chat select` end to end on a tiny model.

The hand computation is independent of the scorer: the text is rendered with the template, tokenized by the
*processor* (the inference path, not encode_chat), the answer's tokens located from the tokenized prompt
(everything up to ``ASSISTANT:``) and the final ``</s>``, and the loss taken from the full logits of an unpadded
single-sequence forward.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOKENIZERS
from internvl_chat.data.scoring import (
    CONTEXTS,
    METRICS,
    ConditionalLossScorer,
    build_context_messages,
    compute_metric,
    read_scores,
)
from internvl_chat.data.select import main as select_main
from internvl_chat.data.select import select_indices
from internvl_chat.templates import render_chat


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from internvl_chat.factories import create

    out = tmp_path_factory.mktemp("tiny-model")
    model, processor, _ = create("llava-v1.5-7b", str(out), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    return model.eval(), processor, out


def _image(seed: int, size=(40, 52)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype("uint8"))


def _msg(role, text, image=False):
    blocks = [{"type": "image"}] if image else []
    return {"role": role, "content": [*blocks, {"type": "text", "text": text}]}


SAMPLES = [
    {
        "id": "single",
        "messages": [_msg("user", "\nWhat is in the picture?", True), _msg("assistant", "A red square on grass.")],
    },
    {
        "id": "duo",
        "messages": [
            _msg("user", "\nWhat is written on the sign?", True),
            _msg("assistant", "STOP"),
            _msg("user", "Why is it written there?"),
            _msg("assistant", "Because cars must stop at the crossing."),
        ],
    },
    {"id": "text", "messages": [_msg("user", "Name a fruit."), _msg("assistant", "An apple, which is red.")]},
]


def _samples():
    out = []
    for i, s in enumerate(SAMPLES):
        n = sum(1 for m in s["messages"] for b in m["content"] if b["type"] == "image")
        out.append({**s, "images": [_image(i) for _ in range(n)], "source": "fixture"})
    return out


def _hand_loss(model, processor, messages, images):
    """Mean CE of the last answer's tokens (no terminator), from an unpadded forward, plus the answer's positions."""
    prompt = render_chat(messages[:-1], "vicuna_v1", add_generation_prompt=True)
    full = render_chat(messages, "vicuna_v1")
    kwargs = {"images": images} if images else {}
    ids_prompt = processor(text=prompt, return_tensors="pt", **kwargs)["input_ids"][0]
    enc = processor(text=full, return_tensors="pt", **kwargs)
    ids = enc["input_ids"][0]
    assert torch.equal(ids[: len(ids_prompt)], ids_prompt)  # the prompt tokenizes to a prefix of the full text
    assert ids[-1].item() == processor.tokenizer.eos_token_id  # "</s>" closes the answer
    answer = list(range(len(ids_prompt), len(ids) - 1))
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    losses = [-logp[p - 1, ids[p]].item() for p in answer]
    return sum(losses) / len(losses), answer, len(ids)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_scorer_equals_hand_computation(tiny, padding_side):
    model, processor, _ = tiny
    samples = _samples()
    scorer = ConditionalLossScorer(model, processor, batch_size=3, padding_side=padding_side, show_progress=False)
    records = scorer.score(samples, contexts=list(CONTEXTS))
    for sample in samples:
        record = records[sample["id"]]
        assert record["status"] == "ok"
        turns = [i for i, m in enumerate(sample["messages"]) if m["role"] == "assistant"]
        assert [a["turn"] for a in record["answers"]] == turns
        for answer, turn in zip(record["answers"], turns):
            for context in CONTEXTS:
                messages, images = build_context_messages(sample, turn, context)
                expected, positions, length = _hand_loss(model, processor, messages, images)
                assert answer["loss"][context] == pytest.approx(expected, rel=1e-5, abs=1e-5), (sample["id"], context)
                assert answer["tokens"][context] == len(positions)
                # Token by token: the scorer's targets are exactly the answer's tokens (no prompt, no image, no </s>).
                (request,) = scorer._requests(sample["id"], sample, [turn], [context])
                assert len(request.input_ids) == length
                assert [i for i, t in enumerate(request.targets) if t] == positions


def test_contexts_hold_what_they_say(tiny):
    sample = _samples()[1]
    text = {c: render_chat(build_context_messages(sample, 3, c)[0], "vicuna_v1") for c in CONTEXTS}
    assert text["none"].endswith("questions. ASSISTANT: Because cars must stop at the crossing.</s>")
    assert "USER: Why is it written there? ASSISTANT: Because" in text["q"] and "<image>" not in text["q"]
    assert "USER: <image>\nWhy is it written there? ASSISTANT:" in text["iq"]
    assert "USER: <image>\nWhat is written on the sign? ASSISTANT: STOP</s>USER: Why is it" in text["iqf"]
    assert len(build_context_messages(sample, 3, "iq")[1]) == 1 and build_context_messages(sample, 3, "q")[1] == []


def test_terminator_option_adds_only_eos(tiny):
    model, processor, _ = tiny
    sample = _samples()[0]
    with_eos = ConditionalLossScorer(model, processor, exclude_terminator=False, show_progress=False)
    without = ConditionalLossScorer(model, processor, show_progress=False)
    (a,) = with_eos._requests("x", sample, [1], ["iq"])
    (b,) = without._requests("x", sample, [1], ["iq"])
    diff = [i for i, (x, y) in enumerate(zip(a.targets, b.targets)) if x != y]
    assert diff == [len(a.input_ids) - 1] and a.input_ids[-1] == processor.tokenizer.eos_token_id


def test_metric_formulas_in_one_registry():
    losses = {"none": 2.0, "q": 1.0, "iq": 0.5, "iqf": 0.25}
    record = {"status": "ok", "answers_mode": "all", "loss": losses}
    assert compute_metric(record, "ifd") == (0.5, None)
    assert compute_metric(record, "vfd") == (0.5, None)
    assert compute_metric(record, "mifd") == (0.25, None)  # VFD × IFD = s(A|I,Q)/s(A)
    assert compute_metric(record, "ffd") == (None, "missing_context")  # scored as "all", FFD needs duo_second
    assert compute_metric({**record, "answers_mode": "duo_second"}, "ffd") == (0.5, None)
    assert compute_metric({"status": "error", "reason": "corrupt_image"}, "mifd") == (None, "corrupt_image")
    assert compute_metric({**record, "loss": {**losses, "none": 0.0}}, "ifd") == (None, "zero_loss")
    assert METRICS["ifd"].verified and not any(METRICS[m].verified for m in ("vfd", "mifd", "ffd"))


def test_selection_rules():
    values = {0: 0.5, 1: 1.2, 2: 0.9, 3: None, 4: 0.7, 5: 0.95, 6: 1.0}
    kept, dropped = select_indices(values, keep=0.5, reasons={3: "corrupt_image"})
    # ratio > 1 dropped first (1.0 stays); 5 remain, int(5 × 0.5) = 2 highest kept, in file order
    assert kept == [5, 6]
    assert dropped == {1: "ratio_gt_max", 3: "corrupt_image", 0: "not_in_top", 2: "not_in_top", 4: "not_in_top"}
    assert select_indices(values, threshold=0.9)[0] == [2, 5, 6]
    assert select_indices(values, keep=3)[0] == [2, 5, 6]
    assert select_indices(values, keep=1.0)[0] == [0, 2, 4, 5, 6]  # a fraction <= 1: 1 keeps all
    assert select_indices({0: 0.8, 1: 0.8, 2: 0.8}, keep=2)[0] == [0, 1]  # ties: file order
    assert select_indices(values, keep=0.5, max_ratio=None)[0] == [1, 5, 6]


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
    contexts = METRICS["mifd"].contexts
    full = ConditionalLossScorer(model, processor, batch_size=4, show_progress=False).score(
        samples, contexts, scores_path=tmp_path / "full.jsonl"
    )
    path = tmp_path / "resumed.jsonl"
    first = ConditionalLossScorer(model, processor, batch_size=2, chunk_size=3, show_progress=False)
    first.score(samples, contexts, scores_path=path, limit=1)  # "killed" after the first chunk
    assert len(read_scores(path)) == 3
    # a torn last line from the kill is ignored
    with open(path, "a") as f:
        f.write('{"key": "s4", "sta')
    second = ConditionalLossScorer(model, processor, batch_size=2, chunk_size=3, show_progress=False)
    resumed = second.score(samples, contexts, scores_path=path)
    assert second.stats["scored"] == 2  # s3 and s4; nothing of the first chunk again (bad ones are retried)
    assert resumed.keys() == full.keys()
    for key, record in full.items():
        assert resumed[key]["status"] == record["status"]
        if record["status"] == "ok":
            for c in contexts:
                assert resumed[key]["loss"][c] == pytest.approx(record["loss"][c], rel=1e-5)
    assert full["bad"]["status"] == "error" and full["bad"]["reason"] == "corrupt_image"
    assert full["gone"]["reason"] == "missing_image"
    assert second.stats["corrupt_image"] == 1 and second.stats["missing_image"] == 1
    # a third run has nothing left but the bad images
    third = ConditionalLossScorer(model, processor, show_progress=False)
    third.score(samples, contexts, scores_path=path)
    assert third.stats["scored"] == 0 and third.stats["corrupt_image"] == 1


def test_ffd_scores_the_second_answer_of_duo_conversations(tiny):
    model, processor, _ = tiny
    samples = _samples()
    scorer = ConditionalLossScorer(model, processor, show_progress=False)
    records = scorer.score(samples, METRICS["ffd"].contexts, answers_mode="duo_second")
    assert records["duo"]["status"] == "ok" and [a["turn"] for a in records["duo"]["answers"]] == [3]
    assert records["single"]["reason"] == "not_duo" and scorer.stats["not_duo"] == 2
    value, reason = compute_metric(records["duo"], "ffd")
    loss = records["duo"]["loss"]
    assert reason is None and value == pytest.approx(loss["iqf"] / loss["iq"])


def test_select_cli_end_to_end(tiny, tmp_path, capsys):
    _, _, model_dir = tiny
    data, records = _write_fixture(tmp_path / "data")
    out = tmp_path / "out" / "selected.json"
    argv = [str(data), "--model", str(model_dir), "--metric", "mifd", "--keep", "0.5", "--output", str(out)]
    assert select_main([*argv, "--image-folder", str(tmp_path / "data"), "--batch-size", "4"]) == 0
    summary = json.loads((tmp_path / "out" / "selected.summary.json").read_text())
    assert json.loads(capsys.readouterr().out)["kept"] == summary["kept"]
    scores = read_scores(tmp_path / "out" / "selected.scores.jsonl")
    # expected kept set from the stored losses with the formula written out here
    mifd = {k: r["loss"]["iq"] / r["loss"]["none"] for k, r in scores.items() if r["status"] == "ok"}
    assert set(mifd) == {f"s{i}" for i in range(5)}
    valid = {k: v for k, v in mifd.items() if v <= 1}
    top = sorted(valid, key=lambda k: -valid[k])[: int(len(valid) * 0.5)]
    expected = [r for r in records if r["id"] in top]
    assert json.loads(out.read_text()) == expected  # verbatim records (extra_field kept), file order
    assert summary["kept"] == len(expected)
    reasons = summary["dropped_by_reason"]
    assert reasons["corrupt_image"] == 1 and reasons["missing_image"] == 1 and reasons["malformed_unknown_role"] == 1
    assert reasons.get("ratio_gt_max", 0) == len(mifd) - len(valid)
    assert summary["total"] == 8 and summary["kept"] + summary["dropped"] == 8
    assert not summary["verified"] and summary["expression"].startswith("mIFD")
    assert (tmp_path / "out" / "selected.hist.png").read_bytes()[:4] == b"\x89PNG"

    # parquet input, no model: re-select from the stored scores with another metric / rule
    from internvl_chat.data import convert

    parquet = tmp_path / "data.parquet"
    convert(data, parquet, to="parquet", on_error="skip")
    out2 = tmp_path / "out2" / "sel.parquet"
    scores_file = tmp_path / "out" / "selected.scores.jsonl"
    argv2 = [str(parquet), "--metric", "vfd", "--threshold", "0", "--scores", str(scores_file), "--output", str(out2)]
    assert select_main(argv2) == 0
    import datasets

    rows = datasets.Dataset.from_parquet(str(out2))
    vfd = {k: r["loss"]["iq"] / r["loss"]["q"] for k, r in scores.items() if r["status"] == "ok"}
    assert sorted(rows["id"]) == sorted(k for k, v in vfd.items() if v <= 1)
    assert all(not math.isnan(v) for v in vfd.values())


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
            assert two[key]["loss"] == pytest.approx(record["loss"], rel=1e-5)
    assert json.loads(out.read_text()) == json.loads((tmp_path / "one" / "sel.json").read_text())
    summary = json.loads((tmp_path / "two" / "sel.summary.json").read_text())
    assert summary["scorer"] == {"scored": 5, "corrupt_image": 1, "missing_image": 1}

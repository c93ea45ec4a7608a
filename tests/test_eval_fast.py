"""The eval runner's fast paths on a tiny model: per-image preprocessing equals the processor's batch call, fast
greedy decoding gives `model.generate`'s answers, and the stats carry the timing breakdown."""

import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOKENIZERS
from internvl_chat.eval import runner
from internvl_chat.eval.run import evaluate, make_parser
from internvl_chat.eval.tasks import Sample

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from internvl_chat.factories import create

    folder = tmp_path_factory.mktemp("model") / "llava-tiny"
    create("llava-v1.5-7b", str(folder), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    model, processor = runner.load_model(str(folder), device="cpu")
    with torch.no_grad():  # larger weights: varied greedy tokens instead of one repeated token
        for p in model.model.language_model.parameters():
            if p.ndim > 1:
                p.mul_(8.0)
    return folder, model, processor


def _samples(tmp_path, n=7):
    """Questions of different lengths; images of different sizes as JPEG files, PNG bytes and a PIL image, plus a
    text-only question."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        image = Image.fromarray((rng.random((20 + 7 * i, 40 - 3 * i, 3)) * 255).astype("uint8"))
        if i % 3 == 0:
            path = tmp_path / f"{i}.jpg"
            image.save(path)
            source = str(path)
        elif i % 3 == 1:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            source = buf.getvalue()
        else:
            source = image
        question = "what is shown" + " here" * (i % 4) + "?\nAnswer the question using a single word or phrase."
        samples.append(Sample(f"q{i}", question, None if i == 4 else source))
    return samples


def _texts(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_per_image_inputs_equal_the_processor_batch_call(tiny, tmp_path):
    _, _, processor = tiny
    batch = _samples(tmp_path)
    prompts = {s.key: runner.build_prompt(processor, s) for s in batch}
    assert runner._supports_per_image(processor)
    reference = runner._prepare(processor, batch, prompts)
    pixels = [runner._load_pixels(processor, s) for s in batch if s.image is not None]
    ours = runner._batch_inputs(processor, batch, prompts, pixels)
    assert set(ours) == set(reference) == {"input_ids", "attention_mask", "pixel_values"}
    for key in reference:
        assert ours[key].dtype == reference[key].dtype and ours[key].shape == reference[key].shape, key
        assert torch.equal(ours[key], reference[key]), key
    assert reference["attention_mask"][:, 0].min() == 0  # left padding was exercised

    # A literal `<image>` in a question fails as it does in the processor, instead of misaligning the features.
    bad = [Sample("x", "what is <image> here?", None)]
    bad_prompts = {"x": runner.build_prompt(processor, bad[0])}
    with pytest.raises(ValueError, match="placeholders"):
        runner._prepare(processor, bad, bad_prompts)
    with pytest.raises(ValueError, match="placeholders"):
        runner._batch_inputs(processor, bad, bad_prompts, [])


def test_per_image_pipeline_gives_the_batch_path_file(tiny, tmp_path, monkeypatch):
    _, model, processor = tiny
    samples = _samples(tmp_path)
    kw = dict(batch_size=3, max_new_tokens=NEW_TOKENS, num_workers=3, prefetch=1)
    _, stats = runner.generate_predictions(model, processor, samples, tmp_path / "per_image.jsonl", **kw)
    monkeypatch.setattr(runner, "_supports_per_image", lambda processor: False)  # the whole-batch processor call
    runner.generate_predictions(model, processor, samples, tmp_path / "batch.jsonl", **kw)
    assert (tmp_path / "per_image.jsonl").read_bytes() == (tmp_path / "batch.jsonl").read_bytes()
    assert len(_texts(tmp_path / "batch.jsonl")) == len(samples)

    # Stats: the old keys, plus the breakdown.
    assert stats["questions"] == len(samples) and stats["batch_size"] == 3 and stats["batches"] == 3
    assert stats["fast_decode"] is False
    assert stats["seconds"] == stats["generate_seconds"] > 0
    assert stats["questions_per_second"] == pytest.approx(len(samples) / stats["seconds"])
    for key in runner.TIMING_KEYS:
        assert stats[key] >= 0, key
    assert stats["prepare_cpu_seconds"] > 0
    assert stats["first_wait_seconds"] <= stats["wait_seconds"]
    parts = sum(stats[k] for k in ("wait_seconds", "transfer_seconds", "generate_seconds", "postprocess_seconds"))
    assert parts <= stats["loop_seconds"] + 1e-6


def _eos_mid_answer(model, processor, samples):
    """A token that the reference decoding emits mid-answer in some rows (not all): as EOS, some answers end early
    while other rows run on. Not a special token, so the answer text shows whether it was kept and what follows."""
    prompts = {s.key: runner.build_prompt(processor, s) for s in samples}
    inputs = runner._prepare(processor, samples, prompts)
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )[:, inputs["input_ids"].shape[1] :]
    for token in out[:, 2].tolist():
        rows = (out[:, :-1] == token).any(1)
        if 0 < int(rows.sum()) < len(samples) and token not in processor.tokenizer.all_special_ids:
            return token
    raise AssertionError(f"no usable token in {out.tolist()}")


def test_fast_decode_gives_generate_answers(tiny, tmp_path, monkeypatch):
    _, model, processor = tiny
    samples = _samples(tmp_path)
    config = copy.deepcopy(model.generation_config)
    # Only the mid-answer token as EOS: the decoder repeats it after a row's end, so the answers show whether the
    # runner turned the repeats into `generate`'s padding.
    config.eos_token_id = [_eos_mid_answer(model, processor, samples)]
    monkeypatch.setattr(model, "generation_config", config)
    kw = dict(batch_size=3, max_new_tokens=NEW_TOKENS, num_workers=2)
    from internvl_chat.generation import FastGreedyDecoder

    rows_seen, real_generate = [], FastGreedyDecoder.generate

    def spy(self, input_ids, *args, **kwargs):
        rows_seen.append(input_ids.shape[0])
        return real_generate(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(FastGreedyDecoder, "generate", spy)
    _, plain = runner.generate_predictions(model, processor, samples, tmp_path / "plain.jsonl", **kw)
    _, fast = runner.generate_predictions(model, processor, samples, tmp_path / "fast.jsonl", fast_decode=True, **kw)
    # 7 questions in batches of 3: the last batch (1 question) is filled to 3 rows, one compiled shape.
    assert rows_seen == [3, 3, 3]
    assert plain["fast_decode"] is False and fast["fast_decode"] is True
    assert (tmp_path / "fast.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    texts = [r["text"] for r in _texts(tmp_path / "plain.jsonl")]
    assert len(set(texts)) > 2 and len({len(t.split()) for t in texts}) > 1  # varied answers, some cut by EOS

    # One decoder per model, reused by the next run (no second compile), sized by the longest prompt.
    decoder = getattr(model, runner._DECODER_ATTR)
    runner.generate_predictions(model, processor, samples, tmp_path / "again.jsonl", fast_decode=True, **kw)
    assert getattr(model, runner._DECODER_ATTR) is decoder
    assert decoder.max_batch_size == 3 and decoder.max_length % 32 == 0
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()


def test_fast_decode_falls_back_when_generate_would_differ(tiny, tmp_path, monkeypatch):
    _, model, processor = tiny
    samples = _samples(tmp_path, n=3)
    config = copy.deepcopy(model.generation_config)
    config.repetition_penalty = 1.3  # a logits processor the decoder does not apply
    monkeypatch.setattr(model, "generation_config", config)
    kw = dict(batch_size=2, max_new_tokens=NEW_TOKENS, num_workers=2)
    _, stats = runner.generate_predictions(model, processor, samples, tmp_path / "a.jsonl", fast_decode=True, **kw)
    assert stats["fast_decode"] is False
    runner.generate_predictions(model, processor, samples, tmp_path / "b.jsonl", **kw)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_fill_rows_repeats_the_last_question():
    ids = torch.tensor([[5, 9, 9, 6], [0, 7, 9, 9], [0, 0, 4, 6]])  # 9: image token, 2 per image
    mask = (ids != 0).long()
    pixels = torch.arange(2 * 3).float().view(2, 3)  # rows 0 and 1 have an image each
    out_ids, out_mask, out_pixels = runner._fill_rows(
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, 5, 9, 2
    )
    assert out_ids.tolist() == ids.tolist() + [[0, 0, 4, 6]] * 2 and out_mask[3:].tolist() == [[0, 0, 1, 1]] * 2
    assert torch.equal(out_pixels, pixels)  # the repeated question has no image
    with_image = {"input_ids": ids[:2], "attention_mask": mask[:2], "pixel_values": pixels}
    out_ids, _, out_pixels = runner._fill_rows(with_image, 4, 9, 2)
    assert out_ids[2:].tolist() == [[0, 7, 9, 9]] * 2
    assert out_pixels.tolist() == pixels.tolist() + [pixels[1].tolist()] * 2
    assert runner._fill_rows(with_image, 2, 9, 2)[0] is with_image["input_ids"]  # full batch: as is


def test_as_generate_output_layout():
    tokens = torch.tensor([[5, 7, 2, 2, 2], [5, 9, 9, 9, 7], [9, 2, 2, 2, 2]])
    out = runner._as_generate_output(tokens, [2, 7], fill_id=0)
    # Row 1 finishes last (step 5): every column kept; each row keeps its first EOS, then padding.
    assert out.tolist() == [[5, 7, 0, 0, 0], [5, 9, 9, 9, 7], [9, 2, 0, 0, 0]]
    # All rows finished by step 2: `generate` stops there.
    out = runner._as_generate_output(torch.tensor([[2, 2, 2], [4, 7, 7]]), [2, 7], fill_id=0)
    assert out.tolist() == [[2, 0], [4, 7]]
    assert torch.equal(runner._as_generate_output(tokens, [], fill_id=0), tokens)


def test_cli_fast_decode_flag(tiny, tmp_path):
    folder, model, processor = tiny
    assert make_parser().parse_args(["--fast-decode"]).fast_decode is True
    assert make_parser().parse_args([]).fast_decode is False
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(3):
        Image.fromarray(np.full((24, 30 + i, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.jpg")
        rows.append({"question_id": i, "image": f"{i}.jpg", "text": "what is this?"})
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(image_folder=str(images), model=model, processor=processor, batch_size=2, max_new_tokens=4)
    evaluate("model_vqa", str(data), output=str(tmp_path / "fast"), fast_decode=True, **kw)
    evaluate("model_vqa", str(data), output=str(tmp_path / "plain"), **kw)
    speed = json.loads((tmp_path / "fast" / "model_vqa" / "speed.json").read_text())
    assert speed["fast_decode"] is True and "wait_seconds" in speed and "generate_seconds" in speed
    preds = "model_vqa/predictions.jsonl"
    assert (tmp_path / "fast" / preds).read_text() == (tmp_path / "plain" / preds).read_text()

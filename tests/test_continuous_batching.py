"""Continuous batching (`serve/batching.py` + the engine's continuous scheduler): every request's greedy tokens equal
`model.generate` run alone for it, whatever joins or leaves the slots around it; sampling is reproducible for a seed;
models the slot cache cannot serve fall back to the window scheduler."""

import io
import threading
import time

import pytest
import torch
from PIL import Image

from test_serve import make_tiny_model, png_bytes


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from internvl_chat.loading import load_model

    folder = make_tiny_model(tmp_path_factory.mktemp("cb") / "tiny-llava")
    return load_model(str(folder))


def requests(loaded, count):
    """Text-only and image prompts of different lengths."""
    from internvl_chat.serve.engine import Engine

    image = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    engine = Engine(*loaded, scheduler="window")  # not started: only its prepare()
    out = []
    for i in range(count):
        if i % 3 == 1:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q" * (i + 1)}]}]
            out.append(engine.prepare(messages, [image]))
        else:
            out.append(engine.prepare([{"role": "user", "content": "word " * (1 + 2 * i)}]))
    return out


def alone(model, prepared, max_new_tokens) -> list[int]:
    ids = torch.tensor([prepared.input_ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=prepared.pixel_values,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, ids.shape[1] :].tolist()


def test_slots_equal_generate_alone_with_joins_leaves_and_wraparound(loaded):
    """Drives the slot decoder step by step: requests join at different steps (several in one prefill), leave at
    their own limits or are cancelled, and the 96-column ring wraps around several times."""
    from internvl_chat.serve.batching import SlotDecoder

    model, processor = loaded
    eos = model.generation_config.eos_token_id
    prepared = requests(loaded, 9)
    max_new = [5, 17, 9, 30, 3, 12, 21, 8, 14]
    arrival = [0, 0, 0, 2, 3, 3, 7, 15, 15]  # step at which each request arrives
    cancel_at = {5: 4}  # request 5 is cancelled after 4 tokens
    slots = SlotDecoder(model, slots=3, max_cache_len=96)
    free, running, tokens = [2, 1, 0], {}, {i: [] for i in range(9)}
    pending, step = list(range(9)), 0

    def take(request, token):
        tokens[request].append(token)
        limit = cancel_at.get(request, max_new[request])
        return len(tokens[request]) >= limit or token == eos

    while pending or running:
        joining = [r for r in pending if arrival[r] <= step][: len(free)]
        if joining:
            assigned = [(free.pop(), r) for r in joining]
            pending = [r for r in pending if r not in joining]
            logits = slots.prefill([(s, prepared[r].input_ids, prepared[r].pixel_values) for s, r in assigned], 0)
            first = slots.sample(logits, [s for s, _ in assigned])
            slots.join([s for s, _ in assigned], first)
            for (slot, request), token in zip(assigned, first.tolist()):
                running[slot] = request
                if take(request, token):
                    del running[slot]
                    slots.release(slot)
                    free.append(slot)
        if running:
            new = slots.step().tolist()
            for slot, request in list(running.items()):
                if take(request, new[slot]):
                    del running[slot]
                    slots.release(slot)
                    free.append(slot)
        step += 1
    assert step > 96 // 3  # the write pointer went round the ring
    for request in range(9):
        expected = alone(model, prepared[request], max_new[request])
        if request in cancel_at:
            expected = expected[: cancel_at[request]]
        assert tokens[request] == expected, request


def test_engine_greedy_equals_generate_alone_under_load(loaded):
    """Requests submitted at different times from several threads, one cancelled mid-stream: every finished answer
    equals `generate` alone (text and token count), and the slots were shared."""
    from internvl_chat.serve.engine import Cancelled, Engine, SamplingParams

    model, processor = loaded
    prepared = requests(loaded, 8)
    max_new = [6, 20, 11, 25, 4, 16, 9, 13]
    engine = Engine(model, processor, max_batch_size=3, batch_window=0.0, max_cache_len=128).start()
    assert engine.scheduler == "continuous"
    results: dict[int, object] = {}
    try:
        victim = engine.submit(requests(loaded, 4)[3], SamplingParams(max_new_tokens=60))

        def client(index):
            time.sleep(0.02 * index)
            results[index] = engine.submit(prepared[index], SamplingParams(max_new_tokens=max_new[index])).text()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        stream = victim.stream()
        next(stream)  # streaming has begun: the request holds a slot
        victim.cancel()
        with pytest.raises(Cancelled):  # after the deltas already queued
            for _ in stream:
                pass
        for thread in threads:
            thread.join(120)
        status = engine.status()
    finally:
        engine.stop()
    assert status["max_batch_seen"] >= 2 and status["cancelled"] == 1 and status["failed"] == 0
    tokenizer = processor.tokenizer
    for index in range(8):
        expected = alone(model, prepared[index], max_new[index])
        text = tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert results[index].text == text, index
        assert results[index].completion_tokens == len(expected), index  # a generated EOS counts, as in OpenAI's


def test_mixed_sampling_is_per_row_and_reproducible(loaded):
    """Sampled and greedy requests share steps: greedy rows still equal `generate` alone, and sampling with the same
    engine seed and arrival order gives the same answers."""
    from internvl_chat.serve.engine import Engine, SamplingParams

    model, processor = loaded
    prepared = requests(loaded, 4)
    params = [
        SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9),
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=12, temperature=0.7),
        SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.5),
    ]

    def run(seed):
        engine = Engine(model, processor, max_batch_size=4, batch_window=0.5, max_cache_len=96, seed=seed).start()
        try:
            handles = [engine.submit(p, sp) for p, sp in zip(prepared, params)]
            answers = [h.text().text for h in handles]
            assert engine.status()["batches"] == 1  # one prefill, one set of steps for all four
            return answers
        finally:
            engine.stop()

    first, second = run(7), run(7)
    assert first == second
    greedy = alone(model, prepared[1], 12)
    assert first[1] == processor.tokenizer.decode(greedy, skip_special_tokens=True).strip()
    assert run(8) != first or run(9) != first  # the seed matters (three identical draws would be a coincidence)


def test_top_p_keeps_only_the_nucleus(loaded):
    from internvl_chat.serve.batching import SlotDecoder

    model, _ = loaded
    slots = SlotDecoder(model, slots=2, max_cache_len=16, seed=0)
    slots.set_sampling(0, 1.0, 0.5)
    logits = torch.full((2, 8), -10.0)
    logits[:, 3] = 5.0  # ~all of the mass: top-p 0.5 keeps only token 3
    logits[:, 5] = 4.0
    draws = {slots.sample(logits, [0, 1])[0].item() for _ in range(50)}
    assert draws == {3}
    slots.set_sampling(0, 100.0, 1.0)  # flat distribution: every token turns up
    draws = {slots.sample(logits, [0, 1])[0].item() for _ in range(200)}
    assert len(draws) == 8
    assert slots.sample(logits, [0, 1])[1].item() == 3  # slot 1 is greedy


def test_context_limit_follows_the_cache(loaded):
    from internvl_chat.serve.engine import ContextLengthExceeded, Engine, SamplingParams

    model, processor = loaded
    engine = Engine(model, processor, max_batch_size=2, max_cache_len=48)
    prepared = requests(loaded, 1)[0]
    with pytest.raises(ContextLengthExceeded, match="max-cache-len"):
        engine.submit(prepared, SamplingParams(max_new_tokens=48))


def test_unsupported_model_falls_back_to_the_window_scheduler(loaded, caplog):
    from internvl_chat.serve.engine import Engine, SamplingParams

    model, processor = loaded
    text_config = model.config.get_text_config(decoder=True)
    text_config.sliding_window = 8
    try:
        engine = Engine(model, processor, max_batch_size=2)
    finally:
        text_config.sliding_window = None
    assert engine.scheduler == "window" and "sliding window" in caplog.text
    engine.start()
    try:
        prepared = requests(loaded, 1)[0]
        answer = engine.submit(prepared, SamplingParams(max_new_tokens=5)).text()
    finally:
        engine.stop()
    expected = processor.tokenizer.decode(alone(model, prepared, 5), skip_special_tokens=True).strip()
    assert answer.text == expected


@pytest.mark.parametrize(
    "preset, tokenizer",
    [
        ("llavar2-phi3.5-mini", "phi-3.5-mini"),  # Phi-3 LLM, multi-path CLIP + ConvNeXt tower
        ("internvl-chat-vit6b-224to336-vicuna-7b", "vicuna-v1.5"),  # InternViT tower
        ("llavar2-llama3.1-8b", "llama-3.1"),  # Llama-3.1 (GQA, llama3 rope), multi-path tower
    ],
)
def test_model_families_decode_continuously(preset, tokenizer):
    """Every family runs on the slot cache (the towers change only the prefill) and equals `generate` alone."""
    from conftest import TOKENIZERS
    from internvl_chat.factories import create
    from internvl_chat.serve.engine import Engine, SamplingParams

    model, processor, _ = create(preset, None, tokenizer=str(TOKENIZERS / tokenizer), tiny=True)
    model.eval()
    engine = Engine(model, processor, max_batch_size=3, batch_window=0.2, max_cache_len=512).start()
    assert engine.scheduler == "continuous"
    prepared = requests((model, processor), 4)
    try:
        answers = [engine.submit(p, SamplingParams(max_new_tokens=5 + 3 * i)) for i, p in enumerate(prepared)]
        answers = [a.text().text for a in answers]
    finally:
        engine.stop()
    for i, (item, answer) in enumerate(zip(prepared, answers)):
        expected = alone(model, item, 5 + 3 * i)
        assert answer == processor.tokenizer.decode(expected, skip_special_tokens=True).strip(), i

"""FastGreedyDecoder (static cache + compiled step) gives exactly `generate(do_sample=False)`'s tokens."""

import pytest
import torch

from conftest import tiny_clip_llama_config
from internvl_chat import InternVLChatForConditionalGeneration
from internvl_chat.generation import FastGreedyDecoder
from test_modeling import IMG, N_IMG


def model_and_prompts():
    torch.manual_seed(0)
    model = InternVLChatForConditionalGeneration(tiny_clip_llama_config()).eval()
    with torch.no_grad():  # larger weights: varied greedy tokens instead of one repeated token
        for p in model.model.language_model.parameters():
            if p.ndim > 1:
                p.mul_(8.0)
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.cat([torch.tensor([1]), torch.full((N_IMG,), IMG), torch.randint(2, 99, (n,), generator=g)])
        for n in (3, 9, 5)
    ]
    width = max(p.numel() for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - p.numel(), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - p.numel()), torch.ones(p.numel())]).long() for p in prompts])
    return model, ids, mask, torch.randn(3, 3, 56, 56, generator=g)


def test_fast_decoder_equals_generate():
    model, ids, mask, pixels = model_and_prompts()
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=False,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    assert len(set(ref[0].tolist())) > 3  # a real sequence, not a single repeated token
    out = FastGreedyDecoder(model, max_batch_size=4, max_length=96, compile=False).generate(
        ids, mask, pixels, max_new_tokens=24
    )
    assert torch.equal(out, ref)


def test_fast_decoder_stops_rows_at_eos():
    model, ids, mask, pixels = model_and_prompts()
    ref = FastGreedyDecoder(model, 4, 96, compile=False).generate(ids, mask, pixels, max_new_tokens=24)
    eos = int(ref[1, 4])  # pretend row 1's fifth token is the end-of-sequence token
    out = FastGreedyDecoder(model, 4, 96, compile=False, sync_every=2).generate(
        ids, mask, pixels, max_new_tokens=24, eos_token_id=eos
    )
    first = (ref[1] == eos).nonzero()[0].item()
    assert out[1, : first + 1].tolist() == ref[1, : first + 1].tolist()
    assert (out[1, first:] == eos).all()
    for row in (0, 2):  # other rows run on until their own EOS
        stop = (ref[row] == eos).nonzero()
        end = stop[0].item() + 1 if len(stop) else 24
        assert out[row, :end].tolist() == ref[row, :end].tolist()


def test_fast_decoder_math_attention_equals_generate():
    """The "math" decode attention (the CPU has no efficient / cuDNN kernels) gives `generate`'s tokens in fp32."""
    model, ids, mask, pixels = model_and_prompts()
    ref = FastGreedyDecoder(model, 4, 96, compile=False).generate(ids, mask, pixels, max_new_tokens=12)
    out = FastGreedyDecoder(model, 4, 96, compile=False, attention="math").generate(
        ids, mask, pixels, max_new_tokens=12
    )
    assert torch.equal(out, ref)


def test_fast_decoder_refuses_unknown_attention():
    model, *_ = model_and_prompts()
    with pytest.raises(ValueError, match="unknown decode attention 'flashy'"):
        FastGreedyDecoder(model, 4, 96, compile=False, attention="flashy")


def test_each_decode_attention_gets_its_own_compiled_step():
    """Two decoders on one model with different `attention` must not share a traced step (the backend is chosen at
    trace time, so a shared graph would silently keep the first decoder's)."""
    from torch._dynamo.utils import counters

    model, ids, mask, pixels = model_and_prompts()
    torch._dynamo.reset()
    counters.clear()
    for name in ("auto", "math", "auto"):
        decoder = FastGreedyDecoder(model, 4, 96, compile=False, attention=name)
        decoder._step = torch.compile(decoder._decode_step, backend="eager")  # dynamo's tracing only, no codegen
        decoder.generate(ids, mask, pixels, max_new_tokens=3)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()

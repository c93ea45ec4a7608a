"""FastGreedyDecoder (static cache + compiled step) gives exactly `generate(do_sample=False)`'s tokens."""

import pytest
import torch

from conftest import tiny_clip_llama_config
from internvl_chat import InternVLChatForConditionalGeneration
from internvl_chat.generation import FastGreedyDecoder
from test_modeling import IMG, N_IMG


def model_and_prompts(**text_overrides):
    torch.manual_seed(0)
    config = tiny_clip_llama_config()
    if text_overrides:
        config = tiny_clip_llama_config(text_config=config.text_config.to_dict() | text_overrides)
    model = InternVLChatForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights: varied greedy tokens instead of one repeated token
        for p in model.model.language_model.parameters():
            if p.ndim > 1:
                p.mul_(8.0)
            elif text_overrides:  # non-zero biases
                p.add_(torch.randn_like(p))
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


def linear_calls_per_step(decoder, ids, mask, pixels):
    """How many weight matmuls (`F.linear`) one decode step runs."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    real_step = decoder._step

    def counted(*args):
        with Count():
            return real_step(*args)

    decoder._step = counted
    decoder.generate(ids, mask, pixels, max_new_tokens=2)  # prefill + exactly one decode step
    return Count.calls


@pytest.mark.parametrize("bias", [False, True])
def test_fused_decode_step_runs_four_projections_per_layer_with_unfused_tokens(bias):
    """Fused: q/k/v as one GEMV, gate/up as one (4 per layer + lm_head) instead of 7, and the same greedy tokens."""
    model, ids, mask, pixels = model_and_prompts(**({"attention_bias": True, "mlp_bias": True} if bias else {}))
    assert (model.model.language_model.layers[0].mlp.up_proj.bias is not None) == bias
    layers = model.config.text_config.num_hidden_layers
    unfused = FastGreedyDecoder(model, 4, 96, compile=False, fuse=False)
    ref = unfused.generate(ids, mask, pixels, max_new_tokens=24)
    fused = FastGreedyDecoder(model, 4, 96, compile=False)
    assert fused.fused is not None
    assert torch.equal(fused.generate(ids, mask, pixels, max_new_tokens=24), ref)
    assert linear_calls_per_step(unfused, ids, mask, pixels) == 7 * layers + 1
    assert linear_calls_per_step(fused, ids, mask, pixels) == 4 * layers + 1


def test_fusing_keeps_the_model_and_its_checkpoint(tmp_path):
    """The fused matrices take over the weights' storage: no copy, the model's forward and saved weights unchanged."""
    from internvl_chat import InternVLChatForConditionalGeneration

    model, ids, mask, pixels = model_and_prompts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    decoder = FastGreedyDecoder(model, 4, 96, compile=False)
    attn = model.model.language_model.layers[0].self_attn
    qkv_weight = decoder.fused.fused[0][0]
    assert attn.k_proj.weight.data_ptr() == qkv_weight[attn.q_proj.weight.shape[0] :].data_ptr()  # a view, no copy
    assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, logits)
    model.save_pretrained(tmp_path)
    reloaded = InternVLChatForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    assert reloaded.keys() == before.keys()
    assert all(torch.equal(reloaded[k], before[k]) for k in before)


def test_decoders_on_one_model_share_its_fused_weights():
    """Two decoders (two batch shapes) on one model fuse once: neither takes the storage from the other."""
    model, ids, mask, pixels = model_and_prompts()
    first = FastGreedyDecoder(model, 4, 96, compile=False)
    weight = first.fused.fused[0][0]
    second = FastGreedyDecoder(model, 8, 128, compile=False)
    for decoder in (first, second, first):
        decoder.generate(ids, mask, pixels, max_new_tokens=2)
        assert first.fused.fused[0][0] is weight and second.fused.fused[0][0] is weight


def test_fused_decoder_refuses_stale_views_after_the_model_moves():
    """`model.to(...)` replaces the parameters; the next generate fuses again instead of reading the old matrices."""
    model, ids, mask, pixels = model_and_prompts()
    decoder = FastGreedyDecoder(model, 4, 96, compile=False)
    decoder.generate(ids, mask, pixels, max_new_tokens=4)
    model.to(torch.float64)
    with torch.no_grad():  # a changed weight must show in the fused step's tokens
        model.model.language_model.layers[0].self_attn.v_proj.weight.mul_(-1)
    pixels = pixels.double()
    ref = FastGreedyDecoder(model, 4, 96, compile=False, fuse=False).generate(ids, mask, pixels, max_new_tokens=12)
    assert torch.equal(decoder.generate(ids, mask, pixels, max_new_tokens=12), ref)
    assert decoder.fused.fused[0][0].dtype == torch.float64


def test_fusion_only_for_llama_layers_of_plain_linears():
    from internvl_chat.generation import FusedDecodeStack

    model, *_ = model_and_prompts()
    lm = model.model.language_model
    assert FusedDecodeStack.unsupported(lm) is None
    lm.layers[0]._hf_hook = object()  # accelerate's device-map hook
    assert "several devices" in FusedDecodeStack.unsupported(lm)
    del lm.layers[0]._hf_hook
    lm.layers[1].mlp.up_proj = torch.nn.Sequential(lm.layers[1].mlp.up_proj)  # e.g. a LoRA / quantized wrapper
    assert "layer 1" in FusedDecodeStack.unsupported(lm)
    assert FastGreedyDecoder(model, 4, 96, compile=False).fused is None
    llama = model.config.text_config
    phi3 = tiny_clip_llama_config(
        text_config={
            k: getattr(llama, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "pad_token_id",
            )
        }
        | {"model_type": "phi3"}
    )
    lm = InternVLChatForConditionalGeneration(phi3).model.language_model
    assert "model_type 'phi3'" in FusedDecodeStack.unsupported(lm)

"""GPU checks of the core model (run on a CUDA machine: `pytest -m gpu tests/test_gpu.py`)."""

import pytest
import torch

from test_modeling import make_pair, sample_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flash_attention_2"])
def test_bf16_parity_with_llava_on_cuda(attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    ours, llava = make_pair(attn)
    ours, llava = ours.to("cuda", torch.bfloat16), llava.to("cuda", torch.bfloat16)
    ids, pixel_values = sample_inputs()
    with torch.no_grad():
        a = ours(input_ids=ids.cuda(), pixel_values=pixel_values.cuda()).logits.float()
        b = llava(input_ids=ids.cuda(), pixel_values=pixel_values.cuda()).logits.float()
    diff = (a - b).abs().max().item()
    print(f"cuda bf16 {attn}: max abs logits diff vs Llava {diff:.3e}")
    assert diff <= 1e-2


def test_intern_vit_sdpa_matches_eager_on_cuda():
    from internvl_chat.modeling.configuration_intern_vit import InternViTConfig
    from internvl_chat.modeling.modeling_intern_vit import InternViTModel

    torch.manual_seed(0)
    config = InternViTConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512, image_size=224
    )
    model = InternViTModel(config).cuda().eval()
    x = torch.randn(2, 3, 336, 336, device="cuda")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(x).last_hidden_state
        model.set_attn_implementation("sdpa")
        sdpa = model(x).last_hidden_state
    assert eager.shape == (2, 577, 256)
    assert (eager - sdpa).abs().max().item() <= 1e-4


def test_batched_generation_on_cuda(tiny_model):
    model = tiny_model.cuda()
    ids, pixel_values = sample_inputs(batch=2)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids.cuda(), pixel_values=pixel_values.cuda(), **kwargs)
    for i in range(2):
        single = model.generate(input_ids=ids[i : i + 1].cuda(), pixel_values=pixel_values[i : i + 1].cuda(), **kwargs)
        assert batched[i].tolist() == single[0].tolist()


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_kernel_matches_reference_on_cuda(kv_heads):
    """torch's flash varlen kernel (the `internvl_varlen` attention) == per-sample causal SDPA, values and grads."""
    from internvl_chat.modeling import modeling_varlen_attention as varlen

    if varlen._torch_varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    lengths = [37, 600, 5, 250]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lengths)
    q = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16)
    fast = varlen._flash_varlen(q, k, v, cu, cu, max(lengths), max(lengths), 0.1)
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad)
    ref = varlen._reference_varlen(q.float(), k.float(), v.float(), cu, cu, 0.1)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.float())
    assert (fast.float() - ref).abs().max().item() <= 2e-2
    for a, b in zip(fast_grads, ref_grads):
        assert (a.float() - b.float()).abs().max().item() <= 5e-2 * max(1.0, b.abs().max().item())


def test_varlen_packed_loss_matches_sdpa_on_cuda(tiny_model):
    """A packed row through `internvl_varlen` gives SDPA's (block-diagonal mask) loss and gradients, bf16."""
    model = tiny_model.cuda().to(torch.bfloat16).train()
    ids, pixel_values = sample_inputs(batch=2)
    ids, pixel_values = ids.cuda(), pixel_values.cuda().to(torch.bfloat16)
    n = ids.shape[1]
    packed = ids.reshape(1, -1)
    positions = torch.arange(n, device="cuda").repeat(2)[None]
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32, device="cuda")
    labels = packed.clone()
    labels[:, ::n] = -100
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
    results = {}
    for attn in ("sdpa", "internvl_varlen"):
        model.set_attn_implementation(attn)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=packed, pixel_values=pixel_values, position_ids=positions, labels=labels,
                    use_cache=False, **kwargs)  # fmt: skip
        out.loss.backward()
        results[attn] = (out.loss.float().item(), model.lm_head.weight.grad.float().clone())
    assert abs(results["sdpa"][0] - results["internvl_varlen"][0]) <= 2e-2
    assert (results["sdpa"][1] - results["internvl_varlen"][1]).abs().max().item() <= 2e-2

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

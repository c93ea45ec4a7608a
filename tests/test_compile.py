"""torch.compile keeps the numbers: compiled decoder layers (the trainer's `compile_layers`, the benches' fast
variants) give eager's logits, loss and gradients on a tiny model, on CPU (inductor's C++ backend)."""

import torch
from torch._dynamo.utils import counters

from test_modeling import IMG, make_pair, sample_inputs


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMG, -100)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def test_compiled_layers_match_eager_logits_loss_and_grads():
    torch._dynamo.reset()
    ours, _ = make_pair("sdpa")
    ours.train()  # dropout is 0 in the tiny config; train mode is what compile_layers runs under
    ids, pixel_values = sample_inputs()
    inputs = {"input_ids": ids, "pixel_values": pixel_values}
    eager = _loss_and_grads(ours, inputs)
    layers = ours.model.language_model.layers
    try:
        for layer in layers:
            layer.compile()
        counters.clear()
        compiled = _loss_and_grads(ours, inputs)
        assert all(layer._compiled_call_impl is not None for layer in layers)
        assert counters["frames"]["ok"] > 0 and counters["stats"]["unique_graphs"] > 0  # dynamo really compiled
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-6, rtol=1e-6)
    assert compiled[2].keys() == eager[2].keys() and len(eager[2]) > 10
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)

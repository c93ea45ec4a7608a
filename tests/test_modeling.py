"""Core model: parity with transformers' LlavaForConditionalGeneration, attention backends, generation, errors."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import tiny_clip_llama_config
from internvl_chat import InternVLChatConfig, InternVLChatForConditionalGeneration

IMG = 100  # image token id of the tiny config
N_IMG = 16  # image tokens per 56px image


def make_pair(attn="eager"):
    """Our tiny model and transformers' Llava with the same weights (randomised, incl. projector biases)."""
    ours_config = tiny_clip_llama_config()
    llava_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**ours_config.vision_config.to_diff_dict()),
        text_config=LlamaConfig(**ours_config.text_config.to_diff_dict()),
        image_token_id=IMG,
        image_seq_length=N_IMG,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(llava_config)
    with torch.no_grad():
        for p in llava.parameters():
            p.normal_(0, 0.05)
    ours = InternVLChatForConditionalGeneration(ours_config)
    missing, unexpected = ours.load_state_dict(llava.state_dict(), strict=True)
    assert not missing and not unexpected
    llava.set_attn_implementation(attn)
    ours.set_attn_implementation(attn)
    return ours.eval(), llava.eval()


def sample_inputs(batch=2, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, text_len), generator=g)
    ids = torch.cat([ids[:, :2], torch.full((batch, N_IMG), IMG), ids[:, 2:]], dim=1)
    pixel_values = torch.randn(batch, 3, 56, 56, generator=g)
    return ids, pixel_values


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_parity_with_transformers_llava(attn):
    ours, llava = make_pair(attn)
    ids, pixel_values = sample_inputs()
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixel_values).logits
        b = llava(input_ids=ids, pixel_values=pixel_values).logits
    diff = (a - b).abs().max().item()
    print(f"max abs logits diff vs LlavaForConditionalGeneration ({attn}): {diff:.3e}")
    assert diff <= 1e-5


def test_state_dict_names_follow_llava(tiny_model):
    keys = set(tiny_model.state_dict())
    assert "model.multi_modal_projector.linear_1.weight" in keys
    assert "model.multi_modal_projector.linear_2.bias" in keys
    assert "lm_head.weight" in keys
    assert any(k.startswith("model.vision_tower.") for k in keys)
    assert any(k.startswith("model.language_model.layers.0.") for k in keys)


def test_eager_and_sdpa_agree():
    ours, _ = make_pair("eager")
    ids, pixel_values = sample_inputs()
    with torch.no_grad():
        eager = ours(input_ids=ids, pixel_values=pixel_values).logits
        ours.set_attn_implementation("sdpa")
        sdpa = ours(input_ids=ids, pixel_values=pixel_values).logits
    assert (eager - sdpa).abs().max().item() <= 1e-5


def test_backbone_returns_hidden_states_aligned_with_input_ids(tiny_model):
    ids, pixel_values = sample_inputs()
    out = tiny_model.model(input_ids=ids, pixel_values=pixel_values)
    assert out.last_hidden_state.shape[:2] == ids.shape
    assert out.image_hidden_states.shape == (2, N_IMG, 64)
    logits = tiny_model.lm_head(out.last_hidden_state)
    assert torch.allclose(logits, tiny_model(input_ids=ids, pixel_values=pixel_values).logits, atol=1e-6)


def test_loss_matches_manual_cross_entropy(tiny_model):
    ids, pixel_values = sample_inputs()
    labels = ids.clone()
    labels[ids == IMG] = -100
    out = tiny_model(input_ids=ids, pixel_values=pixel_values, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    manual = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_image_token_count_mismatch_names_both_numbers(tiny_model):
    ids, pixel_values = sample_inputs()
    with pytest.raises(ValueError, match=r"32 image tokens.*16 image features"):
        tiny_model(input_ids=ids, pixel_values=pixel_values[:1])
    with pytest.raises(ValueError, match=r"32 image tokens.*0 image features"):
        tiny_model(input_ids=ids)


def test_multi_image_and_text_only_samples_in_one_batch(tiny_model):
    """Sample 0 has two images, sample 1 none; each matches its own single-sample run."""
    g = torch.Generator().manual_seed(3)
    text = torch.randint(1, 99, (4,), generator=g)
    two = torch.cat([text[:1], torch.full((N_IMG,), IMG), text[1:2], torch.full((N_IMG,), IMG), text[2:]])
    plain = torch.randint(1, 99, (two.numel(),), generator=g)
    pixel_values = torch.randn(2, 3, 56, 56, generator=g)
    with torch.no_grad():
        batch = tiny_model(input_ids=torch.stack([two, plain]), pixel_values=pixel_values).logits
        one = tiny_model(input_ids=two[None], pixel_values=pixel_values).logits
        text_only = tiny_model(input_ids=plain[None]).logits
    assert torch.allclose(batch[0], one[0], atol=1e-5)
    assert torch.allclose(batch[1], text_only[0], atol=1e-5)


def test_batched_left_padded_generation_equals_one_by_one(tiny_model):
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.cat([torch.tensor([1]), torch.full((N_IMG,), IMG), torch.randint(2, 99, (n,), generator=g)])
        for n in (3, 9)
    ]
    pixel_values = torch.randn(2, 3, 56, 56, generator=g)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    singles = [
        tiny_model.generate(
            input_ids=p[None],
            attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
            pixel_values=pixel_values[i : i + 1],
            **kwargs,
        )[0, p.numel() :]
        for i, p in enumerate(prompts)
    ]
    width = max(p.numel() for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - p.numel(), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - p.numel()), torch.ones(p.numel())]).long() for p in prompts])
    batched = tiny_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **kwargs)
    for i in range(2):
        assert batched[i, width:].tolist() == singles[i].tolist()


@pytest.mark.parametrize("projector_type,n_linear", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_types(projector_type, n_linear):
    model = InternVLChatForConditionalGeneration(tiny_clip_llama_config(projector_type=projector_type))
    names = {k.split(".")[2] for k in model.state_dict() if k.startswith("model.multi_modal_projector.")}
    assert names == {f"linear_{i + 1}" for i in range(n_linear)}
    ids, pixel_values = sample_inputs(batch=1)
    assert model(input_ids=ids, pixel_values=pixel_values).logits.shape[1] == ids.shape[1]


def test_identity_projector_and_cls_patch():
    config = tiny_clip_llama_config(projector_type="identity", vision_feature_select_strategy="cls_patch")
    config.vision_config.hidden_size = 64
    model = InternVLChatForConditionalGeneration(config)
    assert not [k for k in model.state_dict() if "multi_modal_projector" in k]
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, N_IMG + 1), IMG)], dim=1)
    assert model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56)).logits.shape == (1, N_IMG + 2, 128)


def test_bad_projector_and_strategy_names():
    with pytest.raises(ValueError, match="mlp2y_relu"):
        tiny_clip_llama_config(projector_type="mlp2y_relu")
    with pytest.raises(ValueError, match="everything"):
        tiny_clip_llama_config(vision_feature_select_strategy="everything")
    with pytest.raises(ValueError, match="resnet"):
        InternVLChatConfig(vision_config={"model_type": "resnet"})


def test_gradient_checkpointing_gives_same_gradients(tiny_model):
    ids, pixel_values = sample_inputs()
    tiny_model.train()

    def grads():
        tiny_model.zero_grad()
        tiny_model(input_ids=ids, pixel_values=pixel_values, labels=ids.masked_fill(ids == IMG, -100)).loss.backward()
        return {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    plain = grads()
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert any("vision_tower" in n for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-5), name


def test_config_round_trip(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = InternVLChatConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == tiny_config.to_dict()
    assert loaded.vision_config.model_type == "clip_vision_model"
    assert loaded.text_config.model_type == "llama"


def test_llava_hr_fields():
    from internvl_chat.presets import build_config

    config = build_config("llavar2-phi3.5-mini", vocab_size=32064, image_token_id=32011)
    assert config.is_multipath_encoder and config.input_image_size == 768 and not config.use_vision_adapters
    assert config.mm_hidden_size == 1024 and config.image_seq_length == 576
    clip = tiny_clip_llama_config()
    assert not clip.is_multipath_encoder and clip.input_image_size is None


def test_skip_logits_loss_equals_full_logits_loss(tiny_model):
    ids, pixel_values = sample_inputs()
    labels = ids.clone()
    labels[:, :20] = -100  # BOS, image tokens and the first text token unsupervised
    full = tiny_model(input_ids=ids, pixel_values=pixel_values, labels=labels)
    fast = tiny_model(input_ids=ids, pixel_values=pixel_values, labels=labels, skip_logits=True)
    assert fast.logits is None and full.logits is not None
    assert torch.allclose(fast.loss, full.loss, atol=1e-6)
    n = (labels[:, 1:] != -100).sum()
    with_items = tiny_model(
        input_ids=ids, pixel_values=pixel_values, labels=labels, skip_logits=True, num_items_in_batch=n * 2
    )
    assert torch.allclose(with_items.loss * 2, full.loss, atol=1e-6)


def test_supervised_cross_entropy_reductions_share_the_arithmetic(tiny_model):
    """Per-token losses, per-row sums and token stats are the default mean's terms (trainer and scorer use them)."""
    from internvl_chat.modeling.modeling_internvl_chat import supervised_cross_entropy

    ids, pixel_values = sample_inputs()
    labels = ids.clone()
    labels[:, :20] = -100
    labels[1, -3:] = -100  # rows with different numbers of supervised tokens
    with torch.no_grad():
        hidden = tiny_model.model(input_ids=ids, pixel_values=pixel_values).last_hidden_state
        head = tiny_model.lm_head
        mean = supervised_cross_entropy(head, hidden, labels)
        per_token = supervised_cross_entropy(head, hidden, labels, reduction="none", chunk_size=3)
        rows = supervised_cross_entropy(head, hidden, labels, reduction="row_sum", chunk_size=5)
        losses, entropy, correct = supervised_cross_entropy(head, hidden, labels, reduction="none", token_stats=True)
        logits = head(hidden[:, :-1]).float()
    mask = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[:, 1:][mask], reduction="none")
    assert per_token.shape == (int(mask.sum()),) and torch.allclose(per_token, expected, atol=1e-6)
    assert torch.allclose(per_token.mean(), mean, atol=1e-6)
    assert torch.allclose(rows, torch.stack([expected[: mask[0].sum()].sum(), expected[mask[0].sum() :].sum()]))
    assert torch.equal(losses, supervised_cross_entropy(head, hidden, labels, reduction="none"))
    log_probs = logits[mask].log_softmax(-1)
    assert torch.allclose(entropy, -(log_probs.exp() * log_probs).sum(-1), atol=1e-5)
    assert torch.equal(correct, logits[mask].argmax(-1) == labels[:, 1:][mask])
    with pytest.raises(ValueError, match="reduction"):
        supervised_cross_entropy(head, hidden, labels, reduction="sum")


def test_frozen_tower_runs_without_autograd(tiny_model):
    """A frozen tower records no graph even when its inputs are made to require grad (what the Trainer's
    `enable_input_require_grads` does for gradient checkpointing / PEFT); a trainable tower records one."""
    tiny_model.train()
    tiny_model.enable_input_require_grads()
    outputs = []
    hook = tiny_model.model.vision_tower.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    ids, pixel_values = sample_inputs()
    try:
        tiny_model.model.vision_tower.requires_grad_(False)
        features = tiny_model.model.get_image_features(pixel_values)
        tiny_model.model.vision_tower.requires_grad_(True)
        tiny_model.model.get_image_features(pixel_values)
    finally:
        hook.remove()
        tiny_model.disable_input_require_grads()
    frozen, trainable = outputs
    assert frozen.grad_fn is None and not frozen.requires_grad
    assert trainable.grad_fn is not None
    assert features.requires_grad  # the projector still trains
    grads = torch.autograd.grad(features.sum(), tiny_model.model.multi_modal_projector.linear_1.weight)
    assert grads[0].abs().sum() > 0


def test_text_only_batch_runs_the_tower_in_distributed_training(tiny_model, monkeypatch):
    """Sharded training (FSDP / ZeRO-3) needs every rank to run the tower and projector: a batch without images runs
    them on one blank image, adding 0 to the embeddings, so the loss and gradients are those without it."""
    from internvl_chat.modeling import modeling_internvl_chat as mod

    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    calls = []
    hook = tiny_model.model.vision_tower.register_forward_hook(lambda *a: calls.append(a[1]))
    tiny_model.train()
    try:
        single = tiny_model(input_ids=ids, labels=ids)
        single.loss.backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        tiny_model.zero_grad(set_to_none=True)
        assert calls == []  # one process: nothing extra

        monkeypatch.setattr(mod, "_distributed_world_size", lambda: 2)
        multi = tiny_model(input_ids=ids, labels=ids)
        multi.loss.backward()
        assert len(calls) == 1  # the tower ran, on one image
        assert torch.equal(multi.loss, single.loss)
        for name, grad in grads.items():
            assert torch.equal(dict(tiny_model.named_parameters())[name].grad, grad), name
        projector = tiny_model.model.multi_modal_projector.linear_1.weight.grad
        assert projector is not None and not projector.any()  # in the graph (DDP / FSDP see it), zero gradient

        tiny_model.eval()  # inference never pays for it
        with torch.no_grad():
            tiny_model(input_ids=ids)
        assert len(calls) == 1
    finally:
        hook.remove()
        tiny_model.zero_grad(set_to_none=True)
        tiny_model.eval()


# ---------------------------------------------------------------------------- labels the model never learns
def _with_padding(ids):
    """Right-pad row 1 by 3 positions (attention mask 0 there)."""
    ids = ids.clone()
    attention_mask = torch.ones_like(ids)
    ids[1, -3:], attention_mask[1, -3:] = 0, 0
    return ids, attention_mask


@pytest.mark.parametrize("skip_logits", [False, True])
def test_labels_at_image_and_padding_positions_are_ignored(tiny_model, skip_logits):
    """Like LLaVA, image positions (and padding) have no label, whatever the caller passed (TRL's default collator
    copies input_ids into labels)."""
    ids, pixel_values = sample_inputs()
    ids, attention_mask = _with_padding(ids)
    by_hand = ids.clone()
    by_hand[(ids == IMG) | (attention_mask == 0)] = -100
    kwargs = {"input_ids": ids, "pixel_values": pixel_values, "attention_mask": attention_mask}
    copied = tiny_model(**kwargs, labels=ids.clone(), skip_logits=skip_logits).loss
    masked = tiny_model(**kwargs, labels=by_hand, skip_logits=skip_logits).loss
    assert torch.equal(copied, masked)
    # not the same as supervising them: the image token would be a target 32 times
    logits = tiny_model(**kwargs).logits[:, :-1].flatten(0, 1)
    everything = torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten())
    assert not torch.allclose(everything, masked)
    # called as `forward` directly (no hook), the rule holds too
    assert torch.equal(tiny_model.forward(**kwargs, labels=ids.clone(), skip_logits=skip_logits).loss, masked)


def test_labels_are_masked_when_trl_replaces_forward(tiny_model):
    """TRL's SFTTrainer swaps `forward` for a fused LM head that reads `labels` itself: the forward pre-hook still
    takes image and padding positions out of them."""
    from trl.trainer.utils import add_fused_lm_head

    ids, pixel_values = sample_inputs()
    ids, attention_mask = _with_padding(ids)
    by_hand = ids.clone()
    by_hand[(ids == IMG) | (attention_mask == 0)] = -100
    add_fused_lm_head(tiny_model)
    kwargs = {"input_ids": ids, "pixel_values": pixel_values, "attention_mask": attention_mask, "fused_lm_head": True}
    fused = tiny_model(**kwargs, labels=ids.clone())
    assert torch.equal(fused.label_mask, by_hand[:, 1:] != -100)
    assert torch.allclose(fused.loss, tiny_model(**kwargs, labels=by_hand).loss)
    assert torch.allclose(fused.loss, tiny_model(ids, pixel_values, attention_mask, labels=by_hand).loss, atol=1e-6)


def test_return_dict_false_gives_tuples(tiny_model):
    ids, pixel_values = sample_inputs()
    with torch.no_grad():
        full = tiny_model(input_ids=ids, pixel_values=pixel_values, labels=ids)
        as_tuple = tiny_model(input_ids=ids, pixel_values=pixel_values, labels=ids, return_dict=False)
        backbone = tiny_model.model(input_ids=ids, pixel_values=pixel_values, return_dict=False)
    assert (
        isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.loss) and torch.equal(as_tuple[1], full.logits)
    )
    assert isinstance(backbone, tuple) and backbone[0].shape == (*ids.shape, 64)


def test_no_split_modules_come_from_the_tower_and_the_llm(tiny_model):
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(tiny_model._no_split_modules)


def test_multipath_use_adapters_reads_the_old_freeze_vision(tmp_path):
    import json

    from internvl_chat.modeling.configuration_multipath import MultiPathVisionConfig

    assert MultiPathVisionConfig().use_adapters is False  # a stage-1 encoder has no adapters
    config = MultiPathVisionConfig(use_adapters=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_adapters"] is True and "freeze_vision" not in saved
    saved.pop("use_adapters")
    for freeze_vision, use_adapters in ((False, True), (True, False)):
        (tmp_path / "config.json").write_text(json.dumps({**saved, "freeze_vision": freeze_vision}))
        old = MultiPathVisionConfig.from_pretrained(tmp_path)
        assert old.use_adapters is use_adapters and old.freeze_vision is freeze_vision


def test_image_token_count_check_does_not_break_a_compiled_graph(tiny_model):
    """The count check is a tensor condition (no `int()` / `.item()`): the merge traces as one graph."""
    ids, pixel_values = sample_inputs()
    backbone = tiny_model.model
    with torch.no_grad():
        embeds, features = backbone.get_input_embeddings()(ids), backbone.get_image_features(pixel_values)
        torch._dynamo.reset()
        merge = torch.compile(backbone.merge_image_features, fullgraph=True, backend="eager")
        assert torch.equal(merge(ids, embeds, features), backbone.merge_image_features(ids, embeds, features))
        with pytest.raises((RuntimeError, ValueError)):
            merge(ids, embeds, features[:1])
    torch._dynamo.reset()

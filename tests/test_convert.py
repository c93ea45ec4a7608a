"""`internvl-chat convert`: every original layout (docs/checkpoints.md) → ours, compared with the source model computed
without our code (transformers' Llava / Llama / Phi3 / CLIP / InternVLVisionModel, timm's ConvNeXt, PEFT's merge),
plus the safety rules (weights_only pickles, missing shards, truncated files, wrong --from, unknown / missing keys).
"""

import json
import re
import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoProcessor, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import checkpoint_fixtures as fx
from internvl_chat import InternVLChatForConditionalGeneration
from internvl_chat.hub.checkpoint_io import CheckpointError
from internvl_chat.hub.convert import FORMATS, convert, detect_format

ATOL = 2e-5


def load(folder):
    return InternVLChatForConditionalGeneration.from_pretrained(folder).eval()


def logits(model, ids, pixel_values):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits


def ref_logits(llm, ids, features, image_token=fx.IMG):
    """Source-model logits: the LLM on its own embeddings with the image features written at the image tokens."""
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids.clamp(max=llm.config.vocab_size - 1))
        mask = ids == image_token
        embeds[mask] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return llm(inputs_embeds=embeds).logits


def clip_features(llava, pixel_values):
    """transformers' CLIP tower + Llava projector: hidden_states[-2] without CLS, projected."""
    with torch.no_grad():
        hidden = llava.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        return llava.model.multi_modal_projector(hidden)


def llm_of(llava, vocab=fx.VOCAB):
    """The Llava reference's language model as a standalone LlamaForCausalLM with the original vocabulary."""
    llm = LlamaForCausalLM(LlamaConfig(**fx.LLM, vocab_size=vocab)).eval()
    state = {k.replace("model.language_model.", "model."): v for k, v in llava.state_dict().items()}
    state = {k: v for k, v in state.items() if k.startswith("model.layers") or k == "model.norm.weight"}
    state["model.embed_tokens.weight"] = llava.state_dict()["model.language_model.embed_tokens.weight"][:vocab]
    state["lm_head.weight"] = llava.state_dict()["lm_head.weight"][:vocab]
    llm.load_state_dict(state, strict=True)
    return llm


# --------------------------------------------------------------------------------------------------------------
# Original LLaVA-1.5 and ShareGPT4V (CLIP): compare with transformers' LlavaForConditionalGeneration
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,embed_tower", [("bin", False), ("safetensors", True)])
def test_original_llava(tmp_path, fmt, embed_tower):
    llava = fx.reference_llava()
    src, _ = fx.write_original_llava(tmp_path, llava, fmt=fmt, embed_tower=embed_tower)
    assert detect_format(src) == "llava"
    info = convert(src, tmp_path / "out")
    assert info["format"] == "llava" and info["template"] == "vicuna_v1"
    assert sorted(info["skipped_keys"]) == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]
    assert not list((tmp_path / "out").glob("*.bin"))

    ids, pixel_values = fx.image_inputs()
    ours = load(tmp_path / "out")
    diff = (logits(ours, ids, pixel_values)[..., : fx.VOCAB] - logits(llava, ids, pixel_values)[..., : fx.VOCAB]).abs()
    assert diff.max().item() <= ATOL
    # New rows (<image>, padding to 64) are the mean of the old ones: never the argmax of a sample.
    head = ours.lm_head.weight
    assert head.shape[0] == 32064 and torch.allclose(head[32000], head[:32000].mean(0), atol=1e-6)

    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == 32000 == ours.config.image_token_id
    assert tokenizer.pad_token == "<unk>"
    assert processor.image_processor.image_aspect_ratio == "pad"
    assert processor.image_processor.crop_size["height"] == 56
    assert processor.image_seq_length == ours.config.image_seq_length == fx.N_IMG
    assert "ASSISTANT:" in processor.chat_template
    assert ours.generation_config.eos_token_id == [2]


def test_sharegpt4v_tower_in_vision_tower_folder(tmp_path):
    llava = fx.reference_llava(seed=3)
    tower_state, projector, llm = fx.llava_parts(llava)
    src = tmp_path / "ShareGPT4V-7B"
    fx.write_sharded(src, {**llm, **projector}, fmt="safetensors")
    config = fx.original_config("share4v", mm_vision_tower="Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12")
    fx.write_json(src / "config.json", {**config, "architectures": ["Share4VLlamaForCausalLM"]})
    fx.write_clip_tower(src / "vision_tower", tower_state, fmt="bin", clip_model=True)  # pickled, full CLIPModel
    fx.copy_tokenizer(src)
    assert detect_format(src) == "sharegpt4v"
    info = convert(src, tmp_path / "out")
    assert "text_model.embeddings.token_embedding.weight" in info["skipped_keys"]  # the CLIPModel's text half
    ids, pixel_values = fx.image_inputs()
    diff = logits(load(tmp_path / "out"), ids, pixel_values) - logits(llava, ids, pixel_values)
    assert diff[..., : fx.VOCAB].abs().max().item() <= ATOL


# --------------------------------------------------------------------------------------------------------------
# llava-hf (old and new key layouts)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["old", "new"])
def test_llava_hf(tmp_path, layout):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlavaImageProcessor, LlavaProcessor

    llava = fx.reference_llava(seed=5)
    src = tmp_path / "llava-hf"
    llava.save_pretrained(src)  # transformers writes the old layout (language_model.model.*, vision_tower.*)
    state = load_file(src / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in state)
    if layout == "new":
        renamed = {}
        for key, value in state.items():
            if key.startswith("language_model.lm_head."):
                key = key.replace("language_model.lm_head.", "lm_head.")
            elif key.startswith("language_model.model."):
                key = key.replace("language_model.model.", "model.language_model.")
            elif key.startswith("vision_tower."):
                key = "model.vision_tower.vision_model." + key[len("vision_tower.") :]
            else:
                key = "model." + key
            renamed[key] = value
        save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(fx.TOKENIZERS / "vicuna-v1.5")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # 32000, as llava-hf
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # 32001
    image_processor = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14).save_pretrained(src)

    assert detect_format(src) == "llava-hf"
    info = convert(src, tmp_path / "out")
    assert info["vocab_size"] == fx.HF_VOCAB and info["resized"] == []
    ours = load(tmp_path / "out")
    ids, pixel_values = fx.image_inputs()
    assert (logits(ours, ids, pixel_values) - logits(llava, ids, pixel_values)).abs().max().item() <= ATOL
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.tokenizer.pad_token == "<pad>" and processor.image_processor.image_aspect_ratio == "pad"


# --------------------------------------------------------------------------------------------------------------
# Stage-1 artifact and LoRA artifact over a base LLM
# --------------------------------------------------------------------------------------------------------------


def write_base_llm(folder, llm):
    llm.save_pretrained(folder)
    fx.copy_tokenizer(folder)
    return folder


def test_stage1_projector_over_base(tmp_path):
    llava = fx.reference_llava(seed=7)
    tower_state, projector, _ = fx.llava_parts(llava)
    fx.write_clip_tower(tmp_path / "clip", tower_state)
    base = write_base_llm(tmp_path / "vicuna", llm_of(llava))
    src = tmp_path / "llava-v1.5-7b-pretrain"
    src.mkdir()
    torch.save(projector, src / "mm_projector.bin")  # exactly model.mm_projector.{0,2}.{weight,bias}
    config = fx.original_config(mm_vision_tower=str(tmp_path / "clip"), image_aspect_ratio="square")
    fx.write_json(src / "config.json", {**config, "tune_mm_mlp_adapter": True})

    assert detect_format(src) == "stage1"
    info = convert(src, tmp_path / "out", model_base=base)
    ours = load(tmp_path / "out")
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_processor.image_aspect_ratio == "pad" and info["template"] == "vicuna_v1"  # stage 2
    ids, pixel_values = fx.image_inputs()
    expected = ref_logits(llm_of(llava), ids, clip_features(llava, pixel_values))
    assert (logits(ours, ids, pixel_values)[..., : fx.VOCAB] - expected).abs().max().item() <= ATOL
    with pytest.raises(CheckpointError, match="--model-base"):
        convert(src, tmp_path / "out2")


def write_lora(tmp_path, llava, **lora):
    """LLaVA's LoRA output: PEFT adapter over the LLM + non_lora_trainables.bin + the llava config.json."""
    from peft import LoraConfig, get_peft_model

    base_llm = llm_of(llava)
    base = write_base_llm(tmp_path / "vicuna", base_llm)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **lora})
    peft_model = get_peft_model(llm_of(llava), config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    src = tmp_path / "llava-v1.5-7b-lora"
    peft_model.save_pretrained(src)
    _, projector, _ = fx.llava_parts(llava)
    torch.save({"base_model.model." + k: v for k, v in projector.items()}, src / "non_lora_trainables.bin")
    fx.write_json(src / "config.json", fx.original_config(mm_vision_tower=str(tmp_path / "clip")))
    tower_state, _, _ = fx.llava_parts(llava)
    fx.write_clip_tower(tmp_path / "clip", tower_state)
    merged = peft_model.merge_and_unload().eval()  # PEFT's own merge: the reference
    return src, base, merged, peft_model


def test_lora_merged_and_kept(tmp_path):
    from peft import PeftModel

    llava = fx.reference_llava(seed=9)
    src, base, merged, _ = write_lora(tmp_path, llava)
    assert (src / "adapter_config.json").is_file() and (src / "adapter_model.safetensors").is_file()
    assert detect_format(src) == "lora"
    ids, pixel_values = fx.image_inputs()
    expected = ref_logits(merged, ids, clip_features(llava, pixel_values))

    info = convert(src, tmp_path / "merged", model_base=base)
    assert info["merged_lora"] and info["lora_modules"] == 14
    ours = load(tmp_path / "merged")
    assert (logits(ours, ids, pixel_values)[..., : fx.VOCAB] - expected).abs().max().item() <= ATOL

    convert(src, tmp_path / "kept", model_base=base, keep_adapter=True)
    base_model = load(tmp_path / "kept")
    unmerged = logits(base_model, ids, pixel_values)[..., : fx.VOCAB]
    assert (unmerged - expected).abs().max().item() > 1e-3  # the base alone differs: the LoRA matters
    adapted = PeftModel.from_pretrained(base_model, tmp_path / "kept" / "adapter").eval()
    lora_layers = [n for n, _ in adapted.named_modules() if n.endswith("lora_A")]
    assert lora_layers and all("language_model" in n for n in lora_layers)  # not on the CLIP tower's q/k/v
    assert (logits(adapted, ids, pixel_values)[..., : fx.VOCAB] - expected).abs().max().item() <= ATOL


def test_lora_cli_merges_by_default(tmp_path):
    """`convert SRC DST --from lora --model-base BASE` merges, as --help and the docs say; --keep-adapter keeps."""
    from internvl_chat.cli import main

    llava = fx.reference_llava(seed=9)
    src, base, merged, _ = write_lora(tmp_path, llava)
    ids, pixel_values = fx.image_inputs()
    expected = ref_logits(merged, ids, clip_features(llava, pixel_values))
    argv = ["convert", str(src), None, "--from", "lora", "--model-base", str(base)]
    for name, extra in (("default", []), ("merge", ["--merge-lora"]), ("keep", ["--keep-adapter"])):
        argv[2] = str(tmp_path / name)
        assert main([*argv, *extra]) == 0
    for name in ("default", "merge"):
        assert not (tmp_path / name / "adapter").exists()
        assert json.loads((tmp_path / name / "conversion.json").read_text())["merged_lora"] is True
        diff = logits(load(tmp_path / name), ids, pixel_values)[..., : fx.VOCAB] - expected
        assert diff.abs().max().item() <= ATOL
    assert (tmp_path / "keep" / "adapter" / "adapter_config.json").is_file()
    unmerged = logits(load(tmp_path / "keep"), ids, pixel_values)[..., : fx.VOCAB]
    assert (unmerged - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_rank_and_alpha_patterns_match_peft_merge(tmp_path, rslora):
    """Per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern, leaf names and full paths) merge with
    PEFT's own scale, and a kept adapter carries them over to our module names."""
    from peft import PeftModel

    llava = fx.reference_llava(seed=13)
    patterns = dict(
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 8},
        alpha_pattern={"v_proj": 32, "layers.0.self_attn.o_proj": 3},
        use_rslora=rslora,
    )
    src, base, merged, _ = write_lora(tmp_path, llava, **patterns)
    from safetensors.torch import load_file

    saved = load_file(src / "adapter_model.safetensors")  # the patterns took effect in PEFT
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    assert saved["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 8
    assert saved["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 4
    ids, pixel_values = fx.image_inputs()
    expected = ref_logits(merged, ids, clip_features(llava, pixel_values))

    info = convert(src, tmp_path / "merged", model_base=base)
    assert info["lora_pattern_modules"] == 6  # 2 q_proj, 1 down_proj, 2 v_proj, 1 o_proj
    ours = logits(load(tmp_path / "merged"), ids, pixel_values)[..., : fx.VOCAB]
    assert (ours - expected).abs().max().item() <= ATOL

    convert(src, tmp_path / "kept", model_base=base, keep_adapter=True)
    adapted = PeftModel.from_pretrained(load(tmp_path / "kept"), tmp_path / "kept" / "adapter").eval()
    kept = logits(adapted, ids, pixel_values)[..., : fx.VOCAB]
    assert (kept - expected).abs().max().item() <= ATOL


def test_lora_rank_that_contradicts_the_weights_is_named(tmp_path):
    llava = fx.reference_llava(seed=9)
    src, base, _, _ = write_lora(tmp_path, llava)
    config = json.loads((src / "adapter_config.json").read_text())
    config["rank_pattern"] = {"k_proj": 16}
    (src / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"adapter_config\.json: model\.layers\.0\.self_attn\.k_proj has rank 16"
    ):
        convert(src, tmp_path / "out", model_base=base)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# InternVL-Chat-ViT-6B: InternViT inside the checkpoint (fused qkv) vs transformers' InternVLVisionModel
# --------------------------------------------------------------------------------------------------------------


def write_internvl(tmp_path, tower_name, embed_tower=True):
    """InternVL-Chat-ViT-6B: LLM + projector (+ InternViT inside the checkpoint) and an InternVisionModel folder.
    Returns (src, tower_dir, the transformers InternVLVisionModel reference, llm, projector)."""
    import test_intern_vit as tiv

    vit = tiv.reference_model(seed=2)  # transformers InternVLVisionModel, 28px, 4 layers of width 64
    tower = tiv.hf_internvl_vision_to_intern_vit(vit.state_dict(), tiv.LAYERS)
    llm = fx.randomize_(LlamaForCausalLM(LlamaConfig(**fx.LLM, vocab_size=fx.VOCAB)), seed=4).eval()
    generator = torch.Generator().manual_seed(6)
    proj = {
        "model.mm_projector.0.weight": torch.randn(32, tiv.HIDDEN, generator=generator) * 0.1,
        "model.mm_projector.0.bias": torch.randn(32, generator=generator) * 0.1,
        "model.mm_projector.2.weight": torch.randn(32, 32, generator=generator) * 0.1,
        "model.mm_projector.2.bias": torch.randn(32, generator=generator) * 0.1,
    }
    state = {**llm.state_dict(), **proj}
    if embed_tower:
        state.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    src, tower_dir = tmp_path / "InternVL-Chat-ViT-6B-Vicuna-7B", tmp_path / tower_name
    fx.write_sharded(src, fx.add_inv_freq(state), fmt="bin", shards=3)
    fx.write_json(
        tower_dir / "config.json",
        {
            "model_type": "intern_vit_6b",
            "architectures": ["InternVisionModel"],
            "hidden_size": tiv.HIDDEN,
            "num_attention_heads": tiv.HEADS,
            "intermediate_size": tiv.INTERMEDIATE,
            "num_hidden_layers": tiv.LAYERS,
            "image_size": tiv.IMAGE,
            "patch_size": tiv.PATCH,
            "qkv_bias": False,
            "qk_normalization": True,
            "norm_type": "rms_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "use_flash_attn": True,
            "drop_path_rate": 0.0,
            "initializer_factor": 0.1,
        },
    )
    if not embed_tower:  # InternVisionModel's own keys (embeddings.*, encoder.*)
        save_file({k: v.contiguous() for k, v in tower.items()}, str(tower_dir / "model.safetensors"))
    config = fx.original_config(mm_vision_tower=str(tower_dir), mm_hidden_size=tiv.HIDDEN, mm_vision_select_layer=-4)
    fx.write_json(src / "config.json", config)
    fx.copy_tokenizer(src)
    return src, tower_dir, vit, llm, proj


def internvl_expected(vit, llm, proj, ids, pixel_values):
    with torch.no_grad():
        hidden = vit(pixel_values, output_hidden_states=True).hidden_states[-4][:, 1:]
    features = F.linear(
        F.gelu(F.linear(hidden, proj["model.mm_projector.0.weight"], proj["model.mm_projector.0.bias"])),
        proj["model.mm_projector.2.weight"],
        proj["model.mm_projector.2.bias"],
    )
    return ref_logits(llm, ids, features)


def test_internvl_chat_vit6b(tmp_path):
    src, _, vit, llm, proj = write_internvl(tmp_path, "intern_vit_6b_224px")
    assert detect_format(src) == "internvl"
    info = convert(src, tmp_path / "out", image_size=42)  # the tiny 28px tower run larger, as 224 → 336
    ours = load(tmp_path / "out")
    assert ours.config.vision_config.model_type == "intern_vit_6b" and ours.config.image_seq_length == 9
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert tuple(processor.image_processor.image_mean) == (0.485, 0.456, 0.406)
    ids, pixel_values = fx.image_inputs(n_img=9, size=42)
    expected = internvl_expected(vit, llm, proj, ids, pixel_values)
    assert (logits(ours, ids, pixel_values)[..., : fx.VOCAB] - expected).abs().max().item() <= ATOL
    assert info["template"] == "vicuna_v1"


def test_internvl_explicit_tower_folder_decides(tmp_path):
    """`--from internvl --vision-tower DIR`: a tower whose name does not say InternViT-6B is accepted when DIR's
    config.json is an InternViT; a CLIP folder is refused, naming it."""
    from internvl_chat.cli import main

    src, tower_dir, vit, llm, proj = write_internvl(tmp_path, "my-vision-encoder", embed_tower=False)
    config = json.loads((src / "config.json").read_text())
    config["mm_vision_tower"] = "/data/checkpoints/my-vision-encoder"  # not local, no InternViT in the name
    fx.write_json(src / "config.json", config)
    out = tmp_path / "out"
    argv = [
        "convert",
        str(src),
        str(out),
        "--from",
        "internvl",
        "--vision-tower",
        str(tower_dir),
        "--image-size",
        "42",
    ]
    assert main(argv) == 0
    ours = load(out)
    assert ours.config.vision_config.model_type == "intern_vit_6b"
    ids, pixel_values = fx.image_inputs(n_img=9, size=42)
    expected = internvl_expected(vit, llm, proj, ids, pixel_values)
    assert (logits(ours, ids, pixel_values)[..., : fx.VOCAB] - expected).abs().max().item() <= ATOL

    clip_dir = tmp_path / "clip"
    fx.write_json(clip_dir / "config.json", {"model_type": "clip_vision_model", **fx.CLIP})
    with pytest.raises(CheckpointError, match=r"not look like a 'internvl'.*clip.*not InternViT"):
        convert(src, tmp_path / "out2", fmt="internvl", vision_tower=clip_dir)


# --------------------------------------------------------------------------------------------------------------
# LLaVA-HR / LLaVAR-2 (Phi-3): fast CLIP + slow ConvNeXt, adapters, fusion; reference from timm + transformers
# --------------------------------------------------------------------------------------------------------------


def test_llava_hr_llavar2_phi3(tmp_path):
    import timm
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from test_multipath import ref_adapter, ref_align

    torch.manual_seed(0)
    fast = fx.randomize_(CLIPVisionModel(CLIPVisionConfig(**{**fx.CLIP, "num_hidden_layers": 4})), seed=1, scale=0.2)
    slow = timm.create_model(
        "convnext_large_mlp", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10
    )
    fx.randomize_(slow, seed=2, scale=0.2)
    fast.eval(), slow.eval()
    cf, cs = 32, 32
    generator = torch.Generator().manual_seed(3)
    shapes = {
        "slow_conv.weight": (cs, cs, 1, 1),
        "slow_conv.bias": (cs,),
        "slow_proj.weight": (cf, cs, 1, 1),
        "slow_proj.bias": (cf,),
        "fast_conv.weight": (cf, 1, 7, 7),
        "fast_conv.bias": (cf,),
        "fast_proj.weight": (cf, cf, 1, 1),
        "fast_proj.bias": (cf,),
        "gate.0.weight": (cf // 2, 2 * cf),
        "gate.0.bias": (cf // 2,),
        "gate.2.weight": (1, cf // 2),
        "gate.2.bias": (1,),
    }
    adapters = [{k: torch.randn(s, generator=generator) * 0.2 for k, s in shapes.items()} for _ in range(3)]
    fusion = {
        "fast_proj.weight": (cf, cf),
        "fast_proj.bias": (cf,),
        "slow_proj.weight": (cf, cs),
        "slow_proj.bias": (cf,),
    }
    fusion = {k: torch.randn(s, generator=generator) * 0.2 for k, s in fusion.items()}
    phi = Phi3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32064,
        max_position_embeddings=256,
        pad_token_id=32000,
    )
    llm = fx.randomize_(Phi3ForCausalLM(phi), seed=5).eval()
    proj = {
        "model.mm_projector.0.weight": torch.randn(32, cf, generator=generator) * 0.2,
        "model.mm_projector.0.bias": torch.randn(32, generator=generator) * 0.2,
        "model.mm_projector.2.weight": torch.randn(32, 32, generator=generator) * 0.2,
        "model.mm_projector.2.bias": torch.randn(32, generator=generator) * 0.2,
    }

    # The original layout: wrappers' inner levels, LLaVA-HR's ConvNeXt layer scale named `weight`, timm head kept.
    state = {**llm.state_dict(), **proj}
    for k, v in fast.state_dict().items():
        state["model.vision_tower.fast_vision_tower.vision_tower.vision_model." + k] = v
    for k, v in slow.state_dict().items():
        k = k[: -len(".gamma")] + ".weight" if k.endswith(".gamma") else k
        state["model.vision_tower.slow_vision_tower.vision_tower." + k] = v
    for i, adapter in enumerate(adapters):
        state.update({f"model.vision_tower.align_stages_latent.{i}.{k}": v for k, v in adapter.items()})
    state.update({f"model.vision_tower.align_stages.0.{k}": v for k, v in fusion.items()})
    src = tmp_path / "llavar2-phi3"
    fx.write_sharded(src, state, fmt="safetensors")
    config = {
        **phi.to_dict(),
        "architectures": ["LlavaPhiForCausalLM"],
        "model_type": "llava_phi",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": cf,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "image_aspect_ratio": "pad",
        "is_multipath_encoder": True,
        "input_image_size": 64,
        "freeze_vision": False,
        "vision_tower_slow": "convnext_large_mlp.clip_laion2b_ft_320",
        "tokenizer_model_max_length": 4096,
    }
    fx.write_json(src / "config.json", config)
    fx.copy_tokenizer(src, "phi-3.5-mini")
    clip_dir = tmp_path / "clip"  # the fast tower's config (heads cannot be read off the weights)
    fx.write_json(clip_dir / "config.json", {"model_type": "clip_vision_model", **fx.CLIP, "num_hidden_layers": 4})

    assert detect_format(src) == "llava-hr"
    info = convert(src, tmp_path / "out", vision_tower=clip_dir)
    assert info["template"] == "phi3_instruct"
    assert any(".head." in k for k in info["skipped_keys"])  # the ConvNeXt classifier head has no counterpart
    ours = load(tmp_path / "out")
    image_token = ours.config.image_token_id
    assert ours.config.vision_config.freeze_vision is False and ours.config.image_seq_length == 16

    ids, pixel_values = fx.image_inputs(size=64)
    ids[ids == fx.IMG] = image_token
    with torch.no_grad():
        x = pixel_values
        y = F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=True)
        h = fast.pre_layrnorm(fast.embeddings(y)[:, 1:])
        s = slow.forward_features(x)
        for i, layer in enumerate(fast.encoder.layers):
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            if i + 1 in (1, 2, 3):
                shim = types.SimpleNamespace(named_parameters=lambda a=adapters[i]: a.items())
                h = ref_adapter(shim, h, s)
        s_tokens = ref_align(s, 4).flatten(2).transpose(1, 2)
        h = F.linear(h, fusion["fast_proj.weight"], fusion["fast_proj.bias"]) + F.linear(
            s_tokens, fusion["slow_proj.weight"], fusion["slow_proj.bias"]
        )
        features = F.linear(
            F.gelu(F.linear(h, proj["model.mm_projector.0.weight"], proj["model.mm_projector.0.bias"])),
            proj["model.mm_projector.2.weight"],
            proj["model.mm_projector.2.bias"],
        )
    expected = ref_logits(llm, ids, features, image_token=image_token)
    assert (logits(ours, ids, pixel_values) - expected).abs().max().item() <= ATOL


# --------------------------------------------------------------------------------------------------------------
# Output options, CLI, registry
# --------------------------------------------------------------------------------------------------------------


def test_dtype_and_sharding_via_cli(tmp_path):
    from internvl_chat.cli import main

    llava = fx.reference_llava()
    src, tower = fx.write_original_llava(tmp_path, llava)
    out = tmp_path / "out"
    argv = ["convert", str(src), str(out), "--from", "llava", "--vision-tower", str(tower), "--dtype", "bfloat16"]
    assert main([*argv, "--max-shard-size", "1MB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    ours = load(out)
    assert ours.dtype == torch.bfloat16
    ids, pixel_values = fx.image_inputs()
    diff = logits(ours.float(), ids, pixel_values)[..., : fx.VOCAB] - logits(llava, ids, pixel_values)[..., : fx.VOCAB]
    assert diff.abs().max().item() < 0.05  # bf16 rounding of the weights only


def test_registry_has_every_format():
    assert set(FORMATS) == {"llava", "stage1", "lora", "internvl", "llava-hr", "sharegpt4v", "llava-hf"}
    assert all(callable(d) and callable(c) for d, c in FORMATS.values())


# --------------------------------------------------------------------------------------------------------------
# Safety and error reporting
# --------------------------------------------------------------------------------------------------------------


class NotATensor:
    """A pickled object that weights_only loading must refuse."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_non_tensor_object_is_refused(tmp_path):
    llava = fx.reference_llava()
    src, _ = fx.write_original_llava(tmp_path, llava)
    shard = src / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["payload"] = NotATensor()
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"Refusing to load .*pytorch_model-00001-of-00002\.bin"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_formats_are_refused(tmp_path):
    src = tmp_path / "src"
    fx.write_json(src / "config.json", fx.original_config(mm_vision_tower="x"))
    torch.save({"w": torch.zeros(1)}, src / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        convert(src, tmp_path / "out", fmt="llava")


def test_missing_shard_names_the_file(tmp_path):
    src, _ = fx.write_original_llava(tmp_path, fx.reference_llava())
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin"):
        convert(src, tmp_path / "out", fmt="llava")


def test_truncated_safetensors_names_the_file(tmp_path):
    src, _ = fx.write_original_llava(tmp_path, fx.reference_llava(), fmt="safetensors")
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        convert(src, tmp_path / "out")


def test_wrong_from_names_the_config(tmp_path):
    src, _ = fx.write_original_llava(tmp_path, fx.reference_llava())
    for wrong in ("internvl", "llava-hf", "lora", "llava-hr", "sharegpt4v"):
        with pytest.raises(CheckpointError, match=rf"not look like a '{wrong}'.*config\.json|adapter_config"):
            convert(src, tmp_path / "out", fmt=wrong)
    with pytest.raises(CheckpointError, match="Unknown --from 'llava2'"):
        convert(src, tmp_path / "out", fmt="llava2")


def test_unknown_and_missing_keys_are_named(tmp_path):
    llava = fx.reference_llava()
    src, _ = fx.write_original_llava(tmp_path, llava, fmt="safetensors")
    shard = src / "model-00001-of-00002.safetensors"
    from safetensors.torch import load_file

    state = load_file(shard)
    state["model.mm_resampler.weight"] = torch.zeros(2)
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.mm_resampler\.weight \(model-00001-of-00002\.safetensors\)"):
        convert(src, tmp_path / "out")
    info = convert(src, tmp_path / "out", allow_unknown=True)
    assert info["unknown_keys"] == ["model.mm_resampler.weight (model-00001-of-00002.safetensors)"]
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["unknown_keys"] == info["unknown_keys"]

    removed = next(k for k in state if k.endswith("layers.1.mlp.down_proj.weight"))
    del state[removed], state["model.mm_resampler.weight"]
    save_file(state, str(shard), metadata={"format": "pt"})
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"Missing weights.*model\.language_model\.layers\.1\.mlp\.down_proj"):
        convert(src, tmp_path / "out")


@pytest.mark.parametrize(
    "entry", ["../x.safetensors", "../../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors"]
)
def test_shard_index_pointing_outside_is_refused(tmp_path, entry):
    from internvl_chat.hub.checkpoint_io import UnsafeShardPath, weight_files

    src, _ = fx.write_original_llava(tmp_path, fx.reference_llava(), fmt="safetensors")
    outside = tmp_path / "x.safetensors"
    save_file({"model.norm.weight": torch.zeros(32)}, str(outside))  # exists, so only the path rule can refuse it
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = entry
    index_path.write_text(json.dumps(index))
    with pytest.raises(UnsafeShardPath, match=r"model\.safetensors\.index\.json.*" + re.escape(repr(entry))):
        weight_files(src)
    with pytest.raises(UnsafeShardPath, match="outside the checkpoint folder"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlinked_shards_inside_an_index_are_read(tmp_path):
    """A Hub cache snapshot: every file is a symlink into ../../blobs; the index names plain files."""
    llava = fx.reference_llava()
    src, tower = fx.write_original_llava(tmp_path, llava, fmt="safetensors")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in src.glob("model-*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    convert(src, tmp_path / "out")
    ids, pixel_values = fx.image_inputs()
    diff = logits(load(tmp_path / "out"), ids, pixel_values) - logits(llava, ids, pixel_values)
    assert diff[..., : fx.VOCAB].abs().max().item() <= ATOL


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', '{"model": {"type": "Nope"}}'])
def test_corrupt_tokenizer_json_is_one_named_line(tmp_path, capsys, content):
    from internvl_chat.cli import main

    src, _ = fx.write_original_llava(tmp_path, fx.reference_llava())
    (src / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"tokenizer"):
        convert(src, tmp_path / "out")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(src) in err[0] and "tokenizer" in err[0]
    assert "Traceback" not in err[0] and not (tmp_path / "out").exists()


def test_writer_streams_shard_by_shard_with_hub_plan(tmp_path):
    """Each shard is written (and dropped from memory) as soon as its last tensor arrives; the plan is
    huggingface_hub's; files get ordinary permissions, as the JSON files next to them."""
    import os

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file

    from internvl_chat.hub.checkpoint_io import ShardedWriter

    tensors = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(10)}  # 1 KB each in float32
    layout = {name: (tuple(t.shape), torch.bfloat16) for name, t in tensors.items()}
    writer = ShardedWriter(tmp_path, layout, max_shard_size=1500)  # 512 B in bf16: two per shard
    expected = split_torch_state_dict_into_shards(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()}, max_shard_size=1500
    )
    assert writer.split.filename_to_tensors == expected.filename_to_tensors
    for i, (name, tensor) in enumerate(tensors.items()):
        writer.add(name, tensor)
        partials = sorted(p.name for p in tmp_path.glob("*.partial"))
        assert len(partials) == (i + 1) // 2  # a shard is on disk as soon as it is complete
        assert sum(len(b) for b in writer._buffers.values()) == (i + 1) % 2  # and no longer held
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == expected.tensor_to_filename
    for filename, names in expected.filename_to_tensors.items():
        loaded = load_file(tmp_path / filename)
        assert set(loaded) == set(names) and all(loaded[n].dtype == torch.bfloat16 for n in names)
        assert all(torch.equal(loaded[n].float(), tensors[n]) for n in names)
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --------------------------------------------------------------------------------------------------------------
# Every verb: flags that share a `dest` default to the documented one
# --------------------------------------------------------------------------------------------------------------


def _parsers(parser, path=()):
    """(path, parser) for a parser and every sub-command parser below it."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _minimal_argv(parser) -> list[str]:
    """Values for the required arguments only, so every other dest keeps its default."""
    argv = []
    for action in parser._actions:
        if action.option_strings and not action.required or action.nargs in ("?", "*", 0):
            continue
        if type(action).__name__ == "_SubParsersAction":
            continue
        value = str(next(iter(action.choices))) if action.choices else "1" if action.type in (int, float) else "x"
        argv += [*action.option_strings[:1], value]
        if action.nargs == "+" or isinstance(action.nargs, int) and action.nargs > 1:
            argv += [value] * ((action.nargs if isinstance(action.nargs, int) else 1) - 1)
    return argv


@pytest.mark.parametrize("verb", sorted(__import__("internvl_chat.cli", fromlist=["VERBS"]).VERBS))
def test_flags_sharing_a_dest_default_as_documented(verb):
    """argparse takes a shared dest's default from the first flag registered: a `--merge-lora` (store_false) /
    `--keep-adapter` pair then defaults to the opposite of its help. For every pair, the flag whose help says
    "(default)" must be what parsing without either flag gives, and each flag must set its own value."""
    import importlib
    from collections import defaultdict

    from internvl_chat.cli import VERBS

    module = importlib.import_module(VERBS[verb][0])
    for path, parser in _parsers(module.make_parser()):
        groups = defaultdict(list)
        for action in parser._actions:
            if action.dest not in ("help", "==SUPPRESS==") and action.option_strings:
                groups[action.dest].append(action)
        for dest, actions in groups.items():
            if len(actions) < 2:
                continue
            where = f"{verb} {' '.join(path)} {'/'.join(a.option_strings[0] for a in actions)}"
            documented = [a for a in actions if "(default)" in (a.help or "")]
            assert len(documented) == 1, f"{where}: exactly one flag's help must say '(default)'"
            assert all(a.nargs == 0 for a in actions), f"{where}: shared dests are for flag pairs"
            base = _minimal_argv(parser)
            assert getattr(parser.parse_args(base), dest) == documented[0].const, f"{where}: default"
            for action in actions:
                parsed = parser.parse_args([*base, action.option_strings[0]])
                assert getattr(parsed, dest) == action.const, f"{where}: {action.option_strings[0]}"


def test_cli_format_names_are_the_registry():
    """`convert --from` choices are named in the light cli module (fast --help); they must be the registry's."""
    from internvl_chat.hub.convert.cli import FORMAT_NAMES
    from internvl_chat.hub.convert.registry import FORMATS

    assert FORMAT_NAMES == tuple(sorted(FORMATS))

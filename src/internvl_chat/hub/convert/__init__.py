"""`internvl-chat convert`: original research checkpoints → our `internvl_chat_llava` folder (safetensors).

    internvl-chat convert SRC DST [--from FORMAT] [--vision-tower DIR] [--model-base DIR]
                          [--merge-lora | --keep-adapter] [--dtype auto|bfloat16|float16|float32]
                          [--max-shard-size 5GB] [--template NAME] [--image-size N] [--allow-unknown]

    # original LLaVA-1.5 (the CLIP tower is read from a local folder: the flag, or `mm_vision_tower` if local)
    internvl-chat convert llava-v1.5-7b out/llava-7b --vision-tower clip-vit-large-patch14-336
    # stage-1 artifact (mm_projector.bin) over a base LLM → a model ready for stage 2
    internvl-chat convert llava-v1.5-7b-pretrain out/stage2-init --model-base vicuna-7b-v1.5 --vision-tower clip
    # LoRA artifact: merged into the base (the default; PEFT's rank_pattern / alpha_pattern honoured), or kept as a
    # PEFT adapter (DST/adapter) over the unmerged base with --keep-adapter
    internvl-chat convert llava-v1.5-7b-lora out/lora --model-base vicuna-7b-v1.5 --vision-tower clip
    # InternVL-Chat-ViT-6B; an explicit --from internvl with --vision-tower DIR: DIR's config.json decides the tower
    internvl-chat convert InternVL-Chat-ViT-6B-Vicuna-7B out/internvl --from internvl --vision-tower intern_vit_6b
    # llava-hf, InternVL-Chat-ViT-6B, LLaVA-HR / LLaVAR-2, ShareGPT4V: auto-detected
    internvl-chat convert llava-hf/llava-1.5-7b-hf out/llava-7b

Formats (`--from`, detected when omitted; `registry.FORMATS` maps each to its module's `detect` and `plan`):
`llava` (LlavaLlamaForCausalLM, model_type "llava"), `stage1` (mm_projector.bin), `lora` (adapter_config.json +
adapter_model.* + non_lora_trainables.bin), `internvl` (InternViT-6B, fused qkv, inside the checkpoint or in a
tower folder), `llava-hr` (fast/slow towers, adapters, fusion: LLaVA-HR and LLaVAR-2), `sharegpt4v` (model_type
"share4v", tower in `vision_tower/`), `llava-hf` (transformers LlavaForConditionalGeneration, old and new key
layouts).

What the output gets, as the originals did it: the tokenizer with `<image>` as a real token and a pad token (unk,
else a new `<pad>`), embeddings and lm_head resized to a multiple of 64 (new rows = mean of the old rows, so no new
token wins an argmax); the template from the source (`vicuna_v1` for LLaVA / InternVL / ShareGPT4V, `phi3_instruct`,
`llama3`); the image processor from the tower (CLIP or ImageNet statistics, pad mode, input size). Weights are
streamed shard by shard into sharded safetensors with an index (a first pass over names and shapes settles every
key before anything is written); `.bin` files are read only with `torch.load(weights_only=True)`;
`rotary_emb.inv_freq` buffers are skipped; unknown or missing keys stop the
conversion with their names (`--allow-unknown` writes the rest and lists the unknown ones in `conversion.json`).

    from internvl_chat.hub.convert import ConvertOptions, convert
    convert("llava-v1.5-7b-lora", "out/lora", ConvertOptions(model_base="vicuna-7b-v1.5", vision_tower="clip"))
    convert("llava-v1.5-7b", "out/llava-7b", vision_tower="clip")   # the options' fields as keywords

Modules: `common` (options, plan, error, config helpers), `towers`, one module per source format (`llava`,
`stage1`, `lora`, `internvl`, `llava_hr`, `llava_hf`), `registry` (FORMATS, detection, `convert`), `writer` (the
one writer), `cli`.
"""

import importlib

# Where each public name lives. Resolved on first access, so `internvl-chat convert --help` (which imports this
# package for its parser) answers before torch and the format modules load.
_EXPORTS = {
    "main": ".cli",
    "make_parser": ".cli",
    "ConversionError": ".common",
    "ConvertOptions": ".common",
    "Plan": ".common",
    "FORMATS": ".registry",
    "Format": ".registry",
    "convert": ".registry",
    "detect_format": ".registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""`internvl-chat export`: our CLIP-tower model → transformers-native `llava` (LlavaForConditionalGeneration).

    internvl-chat export out/llava-7b out/llava-7b-hf [--dtype auto|bfloat16|float16|float32] [--max-shard-size 5GB]

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained("out/llava-7b-hf")    # no trust_remote_code
    processor = AutoProcessor.from_pretrained("out/llava-7b-hf")

The exported folder drops the remote code, so engines that support Llava serve it as is. It holds the llava-hf
key layout of the published llava-hf checkpoints (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), which transformers 5 (5.17, 5.23) also loads, a
`LlavaConfig`, and a `LlavaProcessor` (`LlavaImageProcessor` with `do_pad` for LLaVA's pad mode, our tokenizer with
`<image>`, our chat template). Only what Llava can express exports: a CLIP tower, the `mlp2x_gelu` projector, one
feature layer, the `pad` or `square` image modes; anything else is refused with the reason. The way back
(llava-hf → ours) is `internvl-chat convert SRC DST --from llava-hf`; the round trip is lossless.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..loading import DTYPE_NAMES

# [IMPORTANT] the checkpoint I/O (torch) is imported inside the functions: `internvl-chat export --help` imports
# this module for its parser and must answer before torch loads.

logger = logging.getLogger(__name__)


def llava_config(config: dict) -> dict:
    """Our config.json (dict) → a LlavaConfig dict, or a ConversionError saying what Llava cannot express."""
    from transformers import LlavaConfig

    from .convert.common import ConversionError

    vision = dict(config["vision_config"])
    if vision.get("model_type") != "clip_vision_model":
        raise ConversionError(
            f"Only CLIP-tower models export to transformers Llava; this one has {vision.get('model_type')!r}."
        )
    if config.get("projector_type") != "mlp2x_gelu":
        raise ConversionError(f"Llava's projector is mlp2x_gelu; this model has {config.get('projector_type')!r}.")
    strategy = {"patch": "default", "cls_patch": "full"}[config.get("vision_feature_select_strategy", "patch")]
    llava = LlavaConfig(
        vision_config=vision,
        text_config=dict(config["text_config"]),
        image_token_id=config["image_token_id"],
        image_seq_length=config["image_seq_length"],
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=config["vision_feature_layer"],
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )
    llava.architectures = ["LlavaForConditionalGeneration"]
    if config.get("dtype"):
        llava.dtype = config["dtype"]
    return llava


def export_processor(src: Path, dst: Path, config: dict) -> None:
    from transformers import AutoTokenizer, LlavaImageProcessor, LlavaProcessor

    from .convert.common import ConversionError, read_json

    processor_config = read_json(src / "processor_config.json") if (src / "processor_config.json").is_file() else {}
    image = processor_config.get("image_processor") or read_json(src / "preprocessor_config.json")
    mode = image.get("image_aspect_ratio", "pad")
    if mode not in ("pad", "square"):
        raise ConversionError(f"Image mode {mode!r} has no LlavaImageProcessor equivalent (pad and square do).")
    size = image.get("crop_size", {}).get("height") or image.get("size", {}).get("shortest_edge")
    image_processor = LlavaImageProcessor(
        do_pad=mode == "pad",  # LLaVA's expand2square: pad with the mean colour, centred
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(image["image_mean"]),
        image_std=list(image["image_std"]),
        resample=3,  # bicubic, as CLIP
    )
    tokenizer = AutoTokenizer.from_pretrained(src)
    template = (src / "chat_template.jinja").read_text() if (src / "chat_template.jinja").is_file() else None
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config["vision_config"]["patch_size"],
        vision_feature_select_strategy="default" if config["vision_feature_select_strategy"] == "patch" else "full",
        chat_template=template,
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS: (size / patch)^2 + 1 - (1 when "default" drops it)
    )
    processor.save_pretrained(dst)


def export(src, dst, dtype: str = "auto", max_shard_size="5GB") -> dict:
    """Writes `src` (ours) as a transformers Llava folder `dst`; returns a summary."""
    from tqdm.auto import tqdm

    from ..keymaps import to_llava_hf_key
    from ..loading import DTYPES
    from .checkpoint_io import ShardedWriter, iter_tensors, tensor_specs, weight_files
    from .convert.common import ConversionError, read_json

    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"Output folder {dst} is not empty.")
    config = read_json(src / "config.json")
    if config.get("model_type") != "internvl_chat_llava":
        raise ConversionError(f"{src / 'config.json'}: model_type {config.get('model_type')!r}, expected ours.")
    llava = llava_config(config)
    files = weight_files(src)
    out_dtype = DTYPES.get(dtype)
    layout, unknown = {}, []
    for path in files:  # first pass: names, shapes and dtypes only
        for name, shape, source_dtype in tensor_specs(path):
            new = to_llava_hf_key(name)
            if new is None:
                unknown.append(f"{name} ({path.name})")
                continue
            cast = out_dtype is not None and source_dtype.is_floating_point
            layout[new] = (shape, out_dtype if cast else source_dtype)
    if unknown:
        raise ConversionError(f"Keys with no llava-hf counterpart: {unknown}")
    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(dst, layout, max_shard_size=max_shard_size)
    try:
        for path in tqdm(files, desc="exporting", unit="file", disable=len(files) < 2):
            for name, tensor in iter_tensors(path):
                writer.add(to_llava_hf_key(name), tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if dtype in DTYPES:
        llava.dtype = dtype
    llava.save_pretrained(dst)
    if (src / "generation_config.json").is_file():
        generation = read_json(src / "generation_config.json")
        (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    export_processor(src, dst, config)
    return {"source": str(src), "output": str(dst), "tensors": len(writer.names), "model_type": "llava"}


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat export", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="our model folder (CLIP tower)")
    parser.add_argument("dst", help="output folder for the transformers Llava checkpoint")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    parser.add_argument("--max-shard-size", default="5GB")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from .checkpoint_io import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = export(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (CheckpointError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

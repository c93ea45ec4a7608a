"""The `internvl-chat convert` command line: flags → `ConvertOptions` → `convert`; errors as one line, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ...loading import DTYPE_NAMES

# The formats `registry.FORMATS` maps (tests/test_convert.py keeps the two equal); named here so `--help` does not
# import the converters (and torch).
FORMAT_NAMES = ("internvl", "llava", "llava-hf", "llava-hr", "lora", "sharegpt4v", "stage1")

logger = logging.getLogger(__name__)


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from . import __doc__ as doc

    parser = parser or argparse.ArgumentParser(prog="internvl-chat convert", description=doc.splitlines()[0])
    parser.add_argument("src", help="folder of the original checkpoint")
    parser.add_argument("dst", help="output folder (must not exist or be empty)")
    parser.add_argument("--from", dest="fmt", choices=FORMAT_NAMES, help="source format (default: detect)")
    parser.add_argument("--vision-tower", help="local CLIP / InternViT tower folder (default: mm_vision_tower)")
    parser.add_argument("--model-base", help="base LLM folder for stage-1 and LoRA artifacts")
    group = parser.add_mutually_exclusive_group()
    # [IMPORTANT] both flags write `keep_adapter`: argparse takes a shared dest's default from the first flag
    # registered (store_false's implicit True), so the documented default is set explicitly.
    group.add_argument("--merge-lora", dest="keep_adapter", action="store_false", help="merge the LoRA (default)")
    group.add_argument("--keep-adapter", dest="keep_adapter", action="store_true", help="write DST/adapter (PEFT)")
    parser.set_defaults(keep_adapter=False)
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="output dtype (auto: as stored)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: SRC, else --model-base)")
    parser.add_argument("--template", help="chat template (default: from the source LLM)")
    parser.add_argument("--image-size", type=int, help="input image size (default: from the tower)")
    parser.add_argument("--projector-type", help="projector of a stage-1 artifact without config.json")
    parser.add_argument("--allow-unknown", action="store_true", help="convert without unknown keys (listed)")
    return parser


def main(argv=None) -> int:
    args = vars(make_parser().parse_args(argv))
    from ..checkpoint_io import CheckpointError
    from .common import ConvertOptions
    from .registry import convert

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src, dst = args.pop("src"), args.pop("dst")
    try:
        info = convert(src, dst, ConvertOptions(**args))
    except (CheckpointError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    summary = {k: v for k, v in info.items() if k not in ("skipped_keys", "unknown_keys")}
    print(json.dumps(summary, indent=2))
    return 0

"""`internvl-chat create`: write a random-init model + processor for a seed model of the zoo.

    internvl-chat create --preset llava-v1.5-7b --output out/llava --tiny \
        --tokenizer tests/fixtures/tokenizers/vicuna-v1.5
    internvl-chat create --preset llavar2-llama3.1-8b --output out/llavar2 --tokenizer DIR   # full size
    internvl-chat create --preset llava-v1.5-13b --output out/x --tokenizer DIR --no-weights  # shapes only

The model is built by `internvl_chat.factories.create`. Full size builds the real shapes on the meta device first
(seconds), reports the parameter counts, then materialises random weights in `--dtype` (bf16 by default) and saves
sharded safetensors; `--no-weights` writes config + processor only. `--tiny` keeps the architecture at a few million
parameters (tests, demo, CI).
"""

import argparse
import json
import logging

from ..presets import PRESETS


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat create", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="seed model to build")
    parser.add_argument("--output", required=True, help="folder to write the model and processor to")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the preset's LLM tokenizer)")
    parser.add_argument("--tiny", action="store_true", help="same architecture at a few million parameters")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-weights", dest="weights", action="store_false", help="full size: config only")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..factories import create  # torch + transformers: after parsing (fast --help)

    try:
        _, _, counts = create(args.preset, args.output, args.tokenizer, args.tiny, args.dtype, args.weights, args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps({"preset": args.preset, "tiny": args.tiny, "output": args.output, **counts}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

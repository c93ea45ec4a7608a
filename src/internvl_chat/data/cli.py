"""`internvl-chat data`: check a training file, or convert it between LLaVA JSON, HF datasets and parquet.

    internvl-chat data check llava.json --image-folder images/ --model out/llava          # processor of a model
    internvl-chat data check llava.json --image-folder images/ --tokenizer DIR --template vicuna_v1 \
        --image-seq-length 576 --max-length 2048 --plot lengths.png --json report.json
    internvl-chat data convert llava.json llava.parquet --to parquet      # or --to datasets (a folder), llava

`check` exits with 1 when a sample would be rejected by training (missing / corrupt image, `<image>` count
mismatch, empty conversation, unknown role, no answer, unbuildable labels), else 0; empty turns are warnings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

# check / encoding / formats are imported inside the commands: check pulls in torch (the image loader), and
# `--help` should answer at once.


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl-chat data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="report bad records / images and the token-length histogram")
    check.add_argument("file", help="LLaVA .json/.jsonl, InternVL meta .json, datasets folder or .parquet")
    check.add_argument("--image-folder", default=None, help="folder that relative image paths are joined to")
    check.add_argument("--model", default=None, help="model / processor folder (tokenizer, template, image tokens)")
    check.add_argument("--tokenizer", default=None, help="tokenizer folder (with --template) instead of --model")
    check.add_argument("--template", default=None, help="template name (default: the processor's chat template)")
    check.add_argument(
        "--image-seq-length", type=int, default=None, help="image tokens per image (default: model's, else 576)"
    )
    check.add_argument("--max-length", type=int, default=None, help="limit (default: tokenizer.model_max_length)")
    check.add_argument("--no-images", action="store_true", help="skip opening the images (structure only)")
    check.add_argument("--workers", type=int, default=4, help="threads decoding images")
    check.add_argument("--plot", default=None, help="write the length histogram PNG here")
    check.add_argument("--json", default=None, help="write the full report as JSON here")
    check.add_argument("--examples", type=int, default=5, help="examples printed per issue kind")

    conv = sub.add_parser("convert", help="convert between llava JSON/JSONL, datasets folder and parquet")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--to", required=True, choices=["llava", "datasets", "parquet"])
    conv.add_argument("--skip-bad", action="store_true", help="drop malformed records (counted) instead of failing")
    return parser


def _encoder(args):
    from .encoding import SampleEncoder

    if args.model:
        from ..modeling import InternVLChatProcessor

        processor = InternVLChatProcessor.from_pretrained(args.model)
        if args.image_seq_length:
            processor.image_seq_length = args.image_seq_length
        return SampleEncoder(processor, template=args.template, max_length=args.max_length, over_length="skip")
    if args.tokenizer:
        from transformers import AutoTokenizer

        if not args.template:
            raise SystemExit("--tokenizer needs --template (e.g. vicuna_v1, plain, phi3_instruct, llama3)")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return SampleEncoder.from_tokenizer(
            tokenizer, args.template, args.image_seq_length or 576, args.max_length, over_length="skip"
        )
    return None


def _check(args) -> int:
    encoder = _encoder(args)
    from .check import check_file

    report = check_file(
        args.file,
        image_folder=args.image_folder,
        encoder=encoder,
        verify_images=not args.no_images,
        workers=args.workers,
    )
    sys.stdout.write(report.format(examples=args.examples) + "\n")
    if encoder is None:
        sys.stdout.write("(no --model / --tokenizer: token lengths not computed)\n")
    if args.plot:
        report.plot(args.plot)
        sys.stdout.write(f"wrote {args.plot}\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=1)
        sys.stdout.write(f"wrote {args.json}\n")
    return 1 if report.errors else 0


def _convert(args) -> int:
    from .formats import convert

    n = convert(args.input, args.output, to=args.to, on_error="skip" if args.skip_bad else "raise")
    sys.stdout.write(f"wrote {n} samples to {args.output} ({args.to})\n")
    return 0


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .formats import DataError

    try:
        return _check(args) if args.command == "check" else _convert(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

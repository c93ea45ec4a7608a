"""`internvl-chat demo`: the whole model package end to end on a tiny random model, in under a minute on a CPU.

    internvl-chat demo [--preset llava-v1.5-7b] [--tokenizer tests/fixtures/tokenizers/vicuna-v1.5] [--output DIR]

1. builds the preset at tiny size with the real tokenizer (`internvl-chat create --tiny`),
2. saves it with its code (`auto_map`), then reloads it in a fresh Python process where `internvl_chat` is not
   importable, with `trust_remote_code=True` and `HF_HUB_OFFLINE=1`,
3. answers a chat message holding an image through `pipeline("image-text-to-text")`.
The weights are random, so the answer is noise; what the demo shows is that every piece loads and runs.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .hub.create import create

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZERS = {
    "vicuna_v1": "tests/fixtures/tokenizers/vicuna-v1.5",
    "phi3_instruct": "tests/fixtures/tokenizers/phi-3.5-mini",
    "llama3": "tests/fixtures/tokenizers/llama-3.1",
}

# Runs in a clean interpreter: `-I` drops the working directory and user site, and the package folder is hidden
# by pointing sys.path at transformers' site-packages only.
PIPELINE_SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
try:
    import internvl_chat  # noqa: F401
    raise SystemExit("internvl_chat must not be importable here")
except ImportError:
    pass
folder = sys.argv[-1]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True, device="cpu")
image = Image.fromarray((np.random.default_rng(0).random((40, 64, 3)) * 255).astype("uint8"))
messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in the image?"}]}]
out = pipe(text=messages, max_new_tokens=12, do_sample=False, return_full_text=False)
print(json.dumps({"model": type(pipe.model).__name__, "answer": out[0]["generated_text"]}))
"""


def run_isolated(folder: str) -> dict:
    """Runs the pipeline in a fresh process where only third-party packages (not internvl_chat) are importable."""
    import transformers

    site = str(Path(transformers.__file__).parent.parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": site, "PYTHONNOUSERSITE": "1"}
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [
                sys.executable,
                "-S",
                "-c",
                "import sys; sys.path.append(sys.argv[1]); exec(sys.argv[2])",
                site,
                PIPELINE_SCRIPT,
                folder,
            ],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"isolated pipeline run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="internvl-chat demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-v1.5-7b")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the matching one under tests/fixtures)")
    parser.add_argument("--output", help="where to save the tiny model (default: a temporary folder)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .presets import get_preset

    tokenizer = args.tokenizer or DEFAULT_TOKENIZERS.get(get_preset(args.preset).template)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.output or os.path.join(tmp, "model")
        _, _, counts = create(args.preset, folder, tokenizer=tokenizer, tiny=True)
        logger.info("1. built tiny %s: %s parameters, saved to %s", args.preset, f"{counts['total']:,}", folder)
        logger.info("   files: %s", ", ".join(sorted(p.name for p in Path(folder).iterdir())))
        result = run_isolated(folder)
    logger.info("2. reloaded in a fresh process without internvl_chat (trust_remote_code=True, HF_HUB_OFFLINE=1)")
    logger.info("3. pipeline('image-text-to-text') → %s answered: %r", result["model"], result["answer"])
    logger.info("demo OK (random weights: the answer is noise; train with the tiny recipes to see it learn)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

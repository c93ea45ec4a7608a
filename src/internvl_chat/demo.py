"""`internvl-chat demo`: build a tiny LLaVA, train it in two stages on CPU on real handwritten digits and rendered
letters, score it on held-out images next to chance, then chat with it from a fresh process.

    internvl-chat demo                           # full run: about 2.5 minutes on 2 CPU cores
    internvl-chat demo --quick                   # the CI-sized run (fewer steps, 200 of the held-out images)
    internvl-chat demo --output out/demo --finetune-steps 400 --preset llava-v1.5-7b

1. builds the preset at tiny size (`create --tiny`: same architecture, ~4 M parameters) with the real tokenizer
   (Vicuna's ships with the package; other presets take `--tokenizer DIR`);
2. writes the built-in dataset (internvl_chat.training.toydata): scikit-learn's 1,797 real handwritten digits and
   capital letters rendered with Pillow's font, each with a caption (stage 1) and a question/answer pair (stage 2);
   digits 0-1499 and 1,040 letters train, the last 297 digits and 260 other letters are held out;
3. stage 1 (`align`, `plain` template): projector only, LLM and tower frozen -> `mm_projector.safetensors`;
4. stage 2 (`finetune`, the preset's template): LLM + projector from the stage-1 projector; the tower stays frozen;
5. greedy answers on the held-out images: accuracy per task next to chance (1/10 digits, 1/26 letters);
6. reloads the trained folder in a fresh Python where `internvl_chat` is not importable (`trust_remote_code=True`,
   `HF_HUB_OFFLINE=1`) and asks the pipeline about a held-out image.
Each stage shows one progress bar (steps, ETA, running loss). Everything stays in `--output` (default `demo-out/`):
`data/`, `align/` (the stage-1 projector) and `finetune/` (the trained model, ready for `internvl-chat chat` /
`serve` and the README's Python snippet). Both stages run the same code as `internvl-chat train` (training.train.run
with recipe dicts, TRL's SFTTrainer). The tiny LLM starts from random weights, so stage 1 can only shape the
projector; the answers are learnt in stage 2.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = "demo-out"
# The Vicuna tokenizer ships with the package (demo_assets/), so the demo runs from any directory of an installed
# package; the other templates' tokenizers are found in a repository checkout's test fixtures, else --tokenizer.
PACKAGED_TOKENIZERS = {"vicuna_v1": "vicuna-v1.5-tokenizer"}
FIXTURE_TOKENIZERS = {"phi3_instruct": "phi-3.5-mini", "llama3": "llama-3.1"}
CHANCE = {"digit": 1 / 10, "letter": 1 / 26}

# Runs in a clean interpreter: `-S` drops site-packages and the working directory; only transformers' site folder
# is appended, so `internvl_chat` is not importable and the folder's own code (auto_map) must be used.
PIPELINE_SCRIPT = r"""
import json, sys
from PIL import Image
from transformers import pipeline
try:
    import internvl_chat  # noqa: F401
    raise SystemExit("internvl_chat must not be importable here")
except ImportError:
    pass
folder, image_path, question = sys.argv[-3:]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True, device="cpu")
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path).convert("RGB")},
                                         {"type": "text", "text": question}]}]
out = pipe(text=messages, max_new_tokens=8, do_sample=False, return_full_text=False)
print(json.dumps({"model": type(pipe.model).__name__, "answer": out[0]["generated_text"]}))
"""


def default_tokenizer(preset: str) -> str:
    """The tokenizer folder the demo uses for `preset` when --tokenizer is not given."""
    from .presets import get_preset

    template = get_preset(preset).template
    if template in PACKAGED_TOKENIZERS:
        return str(Path(__file__).parent / "demo_assets" / PACKAGED_TOKENIZERS[template])
    checkout = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tokenizers"
    if template in FIXTURE_TOKENIZERS and (checkout / FIXTURE_TOKENIZERS[template]).is_dir():
        return str(checkout / FIXTURE_TOKENIZERS[template])
    raise ValueError(f"--preset {preset} uses the {template} template: pass its tokenizer with --tokenizer DIR")


def stage_progress(name: str):
    """A trainer callback drawing one bar for a training stage: step / total, elapsed < ETA, running loss.

    It replaces the trainer's own bar and its raw log-dict lines (training.train.run removes those when a
    ProgressCallback is passed). Away from a terminal (a log file) it redraws every 15 s instead of 10 times a second.
    """
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback

    class StageProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                interval = 0.5 if sys.stderr.isatty() else 15
                self.training_bar = tqdm(total=state.max_steps, desc=name, unit="step", mininterval=interval)
            self.current_step = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {}):
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    return StageProgress()


def run_isolated(folder: str, image_path: str, question: str) -> dict:
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
                os.path.abspath(folder),  # the child runs in a temporary directory
                os.path.abspath(image_path),
                question,
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


def evaluate(model, processor, records: list[dict], image_folder: str, batch_size: int = 64) -> dict:
    """Greedy answers for held-out QA records (toydata format) -> accuracy per kind, with the answers."""
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    model.eval()
    results = {}
    answers = []
    interval = 0.5 if sys.stderr.isatty() else 15
    bar = tqdm(total=len(records), desc="held-out answers", unit="image", mininterval=interval)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts, images = [], []
        for record in chunk:
            question = record["conversations"][0]["value"].replace("<image>\n", "")
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
            images.append(Image.open(os.path.join(image_folder, record["image"])).convert("RGB"))
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        texts = processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])
        for record, text in zip(chunk, texts):
            ok = text.strip().rstrip(".").strip() == record["answer"]
            stats = results.setdefault(record["kind"], [0, 0])
            stats[0] += int(ok)
            stats[1] += 1
            answers.append((record["id"], record["answer"], text))
        bar.update(len(chunk))
    bar.close()
    return {
        "accuracy": {kind: correct / total for kind, (correct, total) in results.items()},
        "counts": {kind: total for kind, (_, total) in results.items()},
        "examples": answers[:5],
    }


def stage_recipes(args, tokenizer: str, data: dict, out: str) -> tuple[dict, dict]:
    """The two recipe dicts (same keys as recipes/tiny/*.yaml)."""
    model = {"preset": args.preset, "tiny": True, "tokenizer": tokenizer, "seed": args.seed}
    common = {
        "per_device_train_batch_size": args.batch_size,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "logging_steps": 10,
        "save_strategy": "no",
        "seed": args.seed,
        "use_cpu": True,
        "gradient_checkpointing": False,  # tiny model: activations are small, recomputation only costs time
        "dataloader_num_workers": 0,
    }
    align = {
        "model": {**model, "image_aspect_ratio": "square"},
        "stage": {"stage": "align"},
        "data": {"data_path": data["align"], "image_folder": data["image_folder"], "template": "plain"},
        "lora": {},
        "training": {
            **common,
            "output_dir": os.path.join(out, "align"),
            "max_steps": args.align_steps,
            "learning_rate": args.align_lr,
        },
    }
    finetune = {
        "model": {**model, "pretrain_mm_mlp_adapter": os.path.join(out, "align", "mm_projector.safetensors")},
        "stage": {"stage": "finetune"},
        "data": {"data_path": data["finetune"], "image_folder": data["image_folder"]},
        "lora": {},
        "training": {
            **common,
            "output_dir": os.path.join(out, "finetune"),
            "max_steps": args.finetune_steps,
            "learning_rate": args.finetune_lr,
        },
    }
    return align, finetune


def _loss(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # None: fewer steps than logging_steps


def make_parser(parser=None):
    parser = parser or argparse.ArgumentParser(
        prog="internvl-chat demo",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Steps, data and defaults: the module docstring (python -m pydoc internvl_chat.demo).",
    )
    parser.add_argument(
        "--preset", default="llava-v1.5-7b", help="seed preset built at tiny size (default: %(default)s)"
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer folder (default: the Vicuna tokenizer shipped with the package for vicuna_v1 presets)",
    )
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help="folder for data/, align/ and the trained model finetune/; kept afterwards (default: %(default)s)",
    )
    parser.add_argument("--align-steps", type=int, default=100, help="stage-1 optimizer steps (default: %(default)s)")
    parser.add_argument(
        "--finetune-steps", type=int, default=1500, help="stage-2 optimizer steps (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default: %(default)s)")
    parser.add_argument("--align-lr", type=float, default=1e-3, help="stage-1 learning rate (default: %(default)s)")
    parser.add_argument("--finetune-lr", type=float, default=2e-3, help="stage-2 learning rate (default: %(default)s)")
    parser.add_argument("--eval-samples", type=int, help="evaluate on the first N held-out images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data order and images (default: 0)")
    parser.add_argument("--quick", action="store_true", help="CI size: 20 + 800 steps, 200 held-out images")
    parser.add_argument("--json", help="also write the measured numbers to this JSON file")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.quick:
        args.align_steps, args.finetune_steps = min(args.align_steps, 20), min(args.finetune_steps, 800)
        args.eval_samples = args.eval_samples or 200
    # The demo's own lines and bars only: a root logger at WARNING keeps other INFO logs (our tables and data
    # summaries, matplotlib's font-cache note...) out of the demo's output.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    import torch
    from transformers.utils import logging as hf_logging

    from .training.toydata import write_toy_dataset
    from .training.train import run

    hf_logging.disable_progress_bar()  # one bar per stage: not transformers' own (loading / writing shards)
    started = time.time()
    tokenizer = args.tokenizer or default_tokenizer(args.preset)
    out = args.output
    data = write_toy_dataset(os.path.join(out, "data"), seed=args.seed)
    logger.info(
        "1. data: %d training / %d held-out images (scikit-learn digits + rendered letters) in %s",
        data["counts"]["train"],
        data["counts"]["eval"],
        data["image_folder"],
    )
    align, finetune = stage_recipes(args, tokenizer, data, out)
    t0 = time.time()
    s1 = run(align, callbacks=[stage_progress("stage 1 (align)")])
    logger.info(
        "2. stage 1 (align: projector only): %d steps, loss %s -> %s, %.0f s",
        s1["global_step"],
        _loss(s1["first_loss"]),
        _loss(s1["last_loss"]),
        time.time() - t0,
    )
    t1 = time.time()
    s2 = run(finetune, callbacks=[stage_progress("stage 2 (finetune)")])
    logger.info(
        "3. stage 2 (finetune: LLM + projector): %d steps, loss %s -> %s, %.0f s",
        s2["global_step"],
        _loss(s2["first_loss"]),
        _loss(s2["last_loss"]),
        time.time() - t1,
    )
    train_seconds = time.time() - t0
    model = s2["trainer"].model
    processor = s2["trainer"].processing_class
    records = json.loads(Path(data["eval"]).read_text())
    if args.eval_samples:
        # Interleave kinds so a subset keeps both tasks.
        digits = [r for r in records if r["kind"] == "digit"]
        letters = [r for r in records if r["kind"] == "letter"]
        half = args.eval_samples // 2
        records = digits[:half] + letters[: args.eval_samples - half]
    t2 = time.time()
    torch.manual_seed(args.seed)
    result = evaluate(model, processor, records, data["image_folder"])
    lines = [
        f"{kind}s: {acc:.1%} of {result['counts'][kind]} held-out images (chance {CHANCE[kind]:.1%})"
        for kind, acc in sorted(result["accuracy"].items())
    ]
    logger.info("4. held-out accuracy (greedy, %.0f s): %s", time.time() - t2, "; ".join(lines))

    sample = next(r for r in records if r["kind"] == "digit")
    question = sample["conversations"][0]["value"].replace("<image>\n", "")
    image_path = os.path.join(data["image_folder"], sample["image"])
    chat = run_isolated(s2["output_dir"], image_path, question)
    logger.info(
        "5. fresh process, trust_remote_code=True, pipeline('image-text-to-text') -> %s\n   Q: %s (%s)\n   A: %r"
        " (truth %r)",
        chat["model"],
        question,
        sample["image"],
        chat["answer"],
        sample["answer"],
    )
    total = time.time() - started
    summary = {
        "preset": args.preset,
        "accuracy": result["accuracy"],
        "chance": {k: CHANCE[k] for k in result["accuracy"]},
        "eval_counts": result["counts"],
        "steps": {"align": s1["global_step"], "finetune": s2["global_step"]},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total, 1),
        "threads": torch.get_num_threads(),
        "model": s2["output_dir"],
        "pipeline_answer": chat["answer"],
        "pipeline_truth": sample["answer"],
    }
    logger.info(
        "demo done in %.0f s (training %.0f s). The trained model is in %s; try it:\n"
        "   internvl-chat chat --model %s --image %s\n"
        "   internvl-chat serve --model %s      # OpenAI-compatible API on 127.0.0.1:8000/v1",
        total,
        train_seconds,
        s2["output_dir"],
        s2["output_dir"],
        image_path,
        s2["output_dir"],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

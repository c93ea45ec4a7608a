"""A small built-in vision-language dataset from real data that ships with registry packages (demo, tiny recipes).

    from internvl_chat.training.toydata import write_toy_dataset
    paths = write_toy_dataset("out/toy", image_size=56, seed=0)
    # paths["align"], paths["finetune"], paths["eval"]: LLaVA JSON files; paths["image_folder"]: the PNGs

Two kinds of images, both 56 x 56 RGB:

* **digits**: scikit-learn's `load_digits` (1,797 real 8 x 8 handwritten digits from UCI, shipped inside the
  scikit-learn wheel, no download), upscaled with bicubic resampling, dark ink on white;
* **letters**: one capital letter A-Z rendered with Pillow's built-in font (FreeType `load_default(size=...)`,
  shipped with Pillow), near the centre with small random offset, size and ink colour, for reading.

Each image gets a stage-1 caption (`plain` template, "a handwritten digit 7") and a stage-2 question/answer pair
("What digit is written in the image?" -> "seven").

# [IMPORTANT] digit answers are number words: with the Llama/Vicuna tokenizer "ASSISTANT: 7</s>" tokenizes as
# ':' '▁' '7' '</s>', and a label mask built from the answer's character span ("7</s>") leaves the lone '▁' (the
# separator space) unsupervised, so a trained model never emits it and cannot start a numeric answer (LLaVA's
# `instruction_len - 2` rule does supervise it). "seven" is one token '▁seven' and is supervised either way.

Digits are split by index (the last ones are held out); letters are drawn with different random streams for train
and eval. Files are LLaVA JSON (`id`, `image`, `conversations`) so that the demo and the tiny recipes go through
the same readers as the real recipes.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DIGIT_QUESTION = "What digit is written in the image?"
LETTER_QUESTION = "Which letter is shown in the image?"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LETTERS = string.ascii_uppercase


def digit_images(image_size: int) -> tuple[list, np.ndarray]:
    """The 1,797 scikit-learn digits as PIL images (image_size x image_size) and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images:  # values 0..16, 0 = background
        ink = (255 - pixels / 16.0 * 255).clip(0, 255).astype("uint8")
        image = Image.fromarray(ink, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
        images.append(image)
    return images, digits.target


def letter_image(letter: str, rng: np.random.Generator, image_size: int):
    """A capital letter rendered with Pillow's built-in FreeType font, near the centre, random size jitter and ink.

    The jitter is small on purpose: the demo's tower is a random, frozen tiny ViT (16 patches), which is far from
    translation invariant; the letters must be readable from its features in a few hundred CPU steps.
    """
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(int(image_size * 0.7), int(image_size * 0.8) + 1))
    font = ImageFont.load_default(size=size)
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    width, height = right - left, bottom - top
    jitter = max(image_size // 16, 1)
    x = (image_size - width) // 2 + int(rng.integers(-jitter, jitter + 1)) - left
    y = (image_size - height) // 2 + int(rng.integers(-jitter, jitter + 1)) - top
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    draw.text((x, y), letter, fill=ink, font=font)
    return image


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def write_toy_dataset(
    folder: str | Path,
    image_size: int = 56,
    n_eval_digits: int = 297,
    n_letters_train: int = 1040,
    n_letters_eval: int = 260,
    max_train: int | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Writes the images and three LLaVA JSON files (align captions, finetune QA, eval QA) under `folder`.

    `max_train` caps each training file (tests use a few dozen samples). Returns the paths and the counts; a
    folder already written with the same arguments is reused (a `toy.json` stamp holds them).
    """
    folder = Path(folder)
    params = dict(
        image_size=image_size,
        n_eval_digits=n_eval_digits,
        n_letters_train=n_letters_train,
        n_letters_eval=n_letters_eval,
        max_train=max_train,
        seed=seed,
    )
    stamp = folder / "toy.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == params:
        return json.loads(stamp.read_text())["paths"]
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    train, evaluation = [], []  # (id, kind, answer, caption)
    digits, labels = digit_images(image_size)
    n_train_digits = len(digits) - n_eval_digits
    for i, (image, label) in enumerate(zip(digits, labels)):
        name = f"digit_{i:04d}.png"
        image.save(images_dir / name)
        # The answer is the number word ("seven", one token "▁seven" for Llama/Vicuna), not "7": see the module doc.
        row = (f"digit-{i}", name, "digit", DIGIT_NAMES[label], f"a handwritten digit {label} ({DIGIT_NAMES[label]})")
        (train if i < n_train_digits else evaluation).append(row)
    for split, count, stream in (("train", n_letters_train, 1), ("eval", n_letters_eval, 2)):
        rng = np.random.default_rng([seed, stream])
        for i in range(count):
            letter = LETTERS[i % len(LETTERS)]
            name = f"letter_{split}_{i:04d}.png"
            letter_image(letter, rng, image_size).save(images_dir / name)
            row = (f"letter-{split}-{i}", name, "letter", letter, f"the capital letter {letter} printed in ink")
            (train if split == "train" else evaluation).append(row)

    order = np.random.default_rng(seed).permutation(len(train))
    train = [train[i] for i in order][:max_train]

    def qa(rows):
        return [
            {
                "id": sid,
                "image": name,
                "kind": kind,
                "answer": answer,
                "conversations": _conversation(DIGIT_QUESTION if kind == "digit" else LETTER_QUESTION, answer),
            }
            for sid, name, kind, answer, _ in rows
        ]

    align = [
        {"id": sid, "image": name, "conversations": _conversation("Describe the image briefly.", caption)}
        for sid, name, _, _, caption in train
    ]
    paths = {
        "align": str(folder / "align.json"),
        "finetune": str(folder / "finetune.json"),
        "eval": str(folder / "eval.json"),
        "image_folder": str(images_dir),
        "counts": {"train": len(train), "eval": len(evaluation)},
    }
    Path(paths["align"]).write_text(json.dumps(align, indent=1))
    Path(paths["finetune"]).write_text(json.dumps(qa(train), indent=1))
    Path(paths["eval"]).write_text(json.dumps(qa(evaluation), indent=1))
    stamp.write_text(json.dumps({"params": params, "paths": paths}, indent=1))
    logger.info("toy dataset: %d train / %d eval samples in %s", len(train), len(evaluation), folder)
    return paths

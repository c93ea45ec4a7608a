"""`internvl-chat caption` (issue 7): dedup by content hash across names and runs, resumption, unreadable images
counted and skipped, LLaVA-format output that the data layer reads, the collator batches and the tiny stage-1
recipe trains on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import TOKENIZERS
from internvl_chat.data.caption import caption_images, collect_images
from internvl_chat.data.caption import main as caption_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from internvl_chat.factories import create

    out = tmp_path_factory.mktemp("tiny-captioner")
    model, processor, _ = create("llava-v1.5-7b", str(out), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    return model.eval(), processor, out


def _folder(root):
    """4 distinct images (one in a sub-folder), a renamed copy of one of them, a corrupt file and a non-image."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()
    rng = np.random.RandomState(0)
    for i, name in enumerate(["a.png", "b.jpg", "c.png", "sub/d.png"]):
        Image.fromarray((rng.rand(30 + i, 40, 3) * 255).astype("uint8")).save(root / name)
    shutil.copy(root / "a.png", root / "sub" / "a_copy.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_caption_twice_no_duplicates(tiny, tmp_path):
    model, processor, _ = tiny
    root = _folder(tmp_path / "images")
    paths, image_root = collect_images(root)
    assert len(paths) == 6 and image_root == str(root)  # notes.txt is not an image
    out = tmp_path / "caps.json"
    first = caption_images(
        model, processor, (paths, image_root), out, batch_size=3, max_new_tokens=6, show_progress=False
    )
    records = json.loads(out.read_text())
    assert first["captioned"] == 4 and first["duplicate"] == 1 and first["unreadable"] == 1
    assert len({r["id"] for r in records}) == len(records) == 4
    assert {r["image"] for r in records} <= {"a.png", "b.jpg", "c.png", "sub/d.png", "sub/a_copy.png"}
    assert all(r["conversations"][0] == {"from": "human", "value": "<image>"} for r in records)
    assert all(r["conversations"][1]["from"] == "gpt" and r["conversations"][1]["value"] for r in records)
    assert not (tmp_path / "caps.json.partial.jsonl").exists()

    second = caption_images(
        model, processor, (paths, image_root), out, batch_size=3, max_new_tokens=6, show_progress=False
    )
    assert second.get("captioned", 0) == 0 and second["duplicate"] == 5 and second["unreadable"] == 1
    assert json.loads(out.read_text()) == records


def test_caption_resumes_after_interruption(tiny, tmp_path):
    model, processor, model_dir = tiny
    root = _folder(tmp_path / "images")
    out = tmp_path / "caps.json"
    # An interrupted run: two images captioned into the partial file, the final JSON never written.
    listing = tmp_path / "list.txt"
    listing.write_text("images/a.png\nimages/b.jpg\n")
    caption_images(
        model,
        processor,
        collect_images(listing),
        tmp_path / "part.jsonl",
        max_new_tokens=4,
        image_root=root,
        show_progress=False,
    )
    shutil.copy(tmp_path / "part.jsonl", tmp_path / "caps.json.partial.jsonl")
    with open(tmp_path / "caps.json.partial.jsonl", "a") as f:
        f.write('{"id": "torn')  # killed mid-line
    argv = [
        str(root),
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--style",
        "detailed",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
    ]
    assert caption_main(argv) == 0
    records = json.loads(out.read_text())
    assert len(records) == len({r["id"] for r in records}) == 4
    # the two resumed records kept their (plain) form; the two new ones are detailed conversations
    human = sorted(r["conversations"][0]["value"] for r in records)
    assert human == [
        "<image>",
        "<image>",
        "<image>\nDescribe this image in detail.",
        "<image>\nDescribe this image in detail.",
    ]


def test_caption_output_loads_collates_and_trains(tiny, tmp_path):
    from torch.utils.data import DataLoader

    from internvl_chat.data import VisionChatDataset
    from internvl_chat.training.collator import VisionChatCollator

    model, processor, _ = tiny
    root = _folder(tmp_path / "images")
    out = tmp_path / "caps.json"
    caption_images(model, processor, collect_images(root), out, max_new_tokens=6, show_progress=False)

    dataset = VisionChatDataset.from_file(out, image_folder=root)
    assert len(dataset) == 4 and not dataset.read_stats
    collator = VisionChatCollator(processor, template="plain")
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collator)))
    assert batch["pixel_values"].shape[0] == 4 and (batch["labels"] != -100).any()

    from internvl_chat.training.train import load_recipe, run

    recipe = load_recipe("recipes/tiny/llava-align.yaml")
    recipe["data"].update(builtin=None, data_path=str(out), image_folder=str(root))
    recipe["training"].update(output_dir=str(tmp_path / "train"), max_steps=1, per_device_train_batch_size=2)
    summary = run(recipe)
    assert summary["global_step"] == 1 and np.isfinite(summary["train_loss"])
    assert summary["collator"]["samples"] >= 2 and summary["collator"]["supervised_tokens"] > 0

"""Data layer: readers (LLaVA JSON/JSONL, HF datasets / parquet, InternVL meta), the lazy Dataset, bad data with
sample id and file (or skipped and counted), converters round-trip, and `internvl-chat data check` / `convert`.

All fixtures are generated in tmp_path: a few 20×16 PNGs, a corrupt "jpg", and small JSON files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from conftest import TOKENIZERS
from internvl_chat.data import DataError, VisionChatDataset, convert, read_samples
from internvl_chat.data.check import check_file
from internvl_chat.data.cli import main as data_main
from internvl_chat.data.encoding import SampleEncoder
from internvl_chat.data.formats import read_llava_records

CLEAN_RECORDS = [
    {
        "id": "img-1",
        "image": "coco/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What color is it?"},
            {"from": "gpt", "value": "Black."},
        ],
    },
    {
        "id": "txt-1",
        "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}],
    },
    {
        "id": "multi-1",
        "image": ["coco/a.png", "b.png"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Compare <image> and <image> please."},
            {"from": "gpt", "value": "Same cat."},
        ],
    },
    {
        "id": "cap-1",
        "image": "b.png",
        "conversations": [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A dog."}],
    },
]


def write_png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def clean(tmp_path):
    images = tmp_path / "images"
    write_png(images / "coco" / "a.png", 0)
    write_png(images / "b.png", 1)
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(CLEAN_RECORDS))
    return path, images


def test_llava_json_reader(clean):
    path, images = clean
    samples = read_samples(path, image_folder=images)
    assert [s["id"] for s in samples] == ["img-1", "txt-1", "multi-1", "cap-1"]
    first = samples[0]
    assert first["source"] == str(path)
    assert first["images"] == [str(images / "coco" / "a.png")]
    assert first["messages"][0] == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is in the image?"}],
    }
    assert first["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}
    assert samples[1]["images"] == []
    assert samples[2]["messages"][0]["role"] == "system" and len(samples[2]["images"]) == 2
    # JSONL gives the same samples (source aside)
    jsonl = path.with_suffix(".jsonl")
    jsonl.write_text("\n".join(json.dumps(r) for r in CLEAN_RECORDS) + "\n")
    again = read_samples(jsonl, image_folder=images)
    assert [{**s, "source": None} for s in again] == [{**s, "source": None} for s in samples]


def test_dataset_lazy_images_and_modality_lengths(clean):
    path, images = clean
    dataset = VisionChatDataset.from_file(path, image_folder=images)
    assert isinstance(dataset.samples[0]["images"][0], str)  # nothing decoded up front
    item = dataset[2]
    assert [im.size for im in item["images"]] == [(20, 16), (20, 16)] and item["images"][0].mode == "RGB"
    assert dataset.modality_lengths[0] > 0 and dataset.modality_lengths[1] < 0
    # LLaVA counts words of every turn, "<image>" included: "<image>\nWhat is in the image?" is 6 words
    assert dataset.modality_lengths[0] == 6 + 2 + 4 + 1
    assert dataset.lengths[0] == 13 + 128 and dataset.lengths[1] == 3


LENGTH_RECORDS = [
    *CLEAN_RECORDS,
    # "<image>" glued to a word is one word for str.split(), as in the original record
    {
        "id": "glued",
        "image": "b.png",
        "conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A dog ."}],
    },
    {"id": "tabs", "conversations": [{"from": "human", "value": " a\tb\n\nc "}, {"from": "gpt", "value": "d"}]},
]


def llava_lengths(records):
    """The original LazySupervisedDataset.lengths / .modality_lengths, on the raw records."""
    lengths, modality = [], []
    for sample in records:
        words = sum(len(conv["value"].split()) for conv in sample["conversations"])
        lengths.append(words + (128 if "image" in sample else 0))
        modality.append(words if "image" in sample else -words)
    return lengths, modality


def test_word_length_rule_is_llavas_for_dataset_and_trainer(clean):
    """One rule (data.formats.modality_length) for the dataset and the trainer's HF-dataset route, equal to
    LLaVA's on the raw records: "<image>" counts as a word, +128 in `lengths` for image samples."""
    from internvl_chat.training.trainer import modality_lengths

    path, images = clean
    path.write_text(json.dumps(LENGTH_RECORDS))
    lengths, modality = llava_lengths(LENGTH_RECORDS)
    assert modality[:5] == [13, -3, 9, 6, 4]  # the rule itself, written out: img-1 .. glued
    dataset = VisionChatDataset.from_file(path, image_folder=images)
    assert dataset.lengths == lengths
    assert dataset.modality_lengths == modality
    assert modality_lengths(dataset) == modality
    assert modality_lengths(dataset.to_hf_dataset()) == modality  # the column route (TRL's HF view)


def test_text_only_sample_without_words_is_named_by_the_sampler(clean):
    from internvl_chat.training.trainer import ModalityLengthGroupedSampler

    path, images = clean
    empty = {"id": "empty", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": ""}]}
    path.write_text(json.dumps([*CLEAN_RECORDS, empty]))
    dataset = VisionChatDataset.from_file(path, image_folder=images)
    assert dataset.modality_lengths[-1] == 0 and dataset.lengths[-1] == 0  # LLaVA's value (its sampler asserts)
    with pytest.raises(ValueError, match=r"index \[4\]"):
        list(ModalityLengthGroupedSampler(dataset.modality_lengths, batch_size=2, world_size=1))


def test_dataloader_workers_with_collator(clean):
    """Zero dropped samples on a clean file through a 2-worker DataLoader; counters are shared with workers."""
    from internvl_chat.factories import build_processor, prepare_tokenizer
    from internvl_chat.training.collator import VisionChatCollator

    path, images = clean
    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / "vicuna-v1.5"), 2048)
    processor = build_processor("llava-v1.5-7b", tokenizer, 16, tiny=True)
    dataset = VisionChatDataset.from_file(path, image_folder=images)
    collator = VisionChatCollator(processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(dataset)
    assert sum(b["pixel_values"].shape[0] for b in batches) == 4
    for b in batches:
        assert ((b["labels"] != -100).sum(1) > 0).all()
    assert collator.stats["samples"] == 4 and collator.stats["skipped_over_length"] == 0
    assert dataset.stats["loaded"] == 4 and dataset.stats["skipped_image"] == 0


def test_hf_view_for_trl_gives_the_same_batch(clean):
    """TRL's SFTTrainer takes only HF datasets: the HF view (image references) collates to the same batch."""
    from internvl_chat.factories import build_processor, prepare_tokenizer
    from internvl_chat.training.collator import VisionChatCollator

    path, images = clean
    tokenizer, _ = prepare_tokenizer(str(TOKENIZERS / "vicuna-v1.5"), 2048)
    collator = VisionChatCollator(build_processor("llava-v1.5-7b", tokenizer, 16, tiny=True))
    dataset = VisionChatDataset.from_file(path, image_folder=images)
    hf = dataset.to_hf_dataset()
    assert hf.column_names == ["id", "messages", "images", "source"]
    direct = collator([dataset[i] for i in range(len(dataset))])
    via_hf = collator([hf[i] for i in range(len(hf))])
    assert direct.keys() == via_hf.keys()
    for key in direct:
        assert torch.equal(direct[key], via_hf[key]), key
    broken = {**hf[0], "images": [{"bytes": None, "path": str(images / "gone.png")}]}
    with pytest.raises(DataError, match=r"img-1.*gone\.png|gone\.png.*img-1"):
        collator([broken])


# ------------------------------------------------------------------------------------------------- bad data
BAD = {
    "missing_image": {
        "id": "bad-missing",
        "image": "nope.png",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo."}],
    },
    "corrupt_image": {
        "id": "bad-corrupt",
        "image": "corrupt.jpg",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo."}],
    },
    "image_count": {
        "id": "bad-count",
        "image": "b.png",
        "conversations": [{"from": "human", "value": "<image>\n<image>\nHi"}, {"from": "gpt", "value": "Yo."}],
    },
    "empty_conversation": {"id": "bad-empty", "conversations": []},
    "unknown_role": {
        "id": "bad-role",
        "conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo."}],
    },
}


@pytest.fixture
def bad_dir(clean):
    path, images = clean
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return path.parent, images


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_data_fails_with_id_and_file(bad_dir, kind):
    folder, images = bad_dir
    path = folder / f"{kind}.json"
    path.write_text(json.dumps([CLEAN_RECORDS[1], BAD[kind]]))
    with pytest.raises(DataError) as info:
        dataset = VisionChatDataset.from_file(path, image_folder=images)
        [dataset[i] for i in range(len(dataset))]
    assert info.value.kind == kind
    assert BAD[kind]["id"] in str(info.value) and str(path) in str(info.value)

    # Skipped under the explicit flag, and counted
    dataset = VisionChatDataset.from_file(path, image_folder=images, on_error="skip")
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item["id"] == "txt-1" for item in items)
    skipped = dataset.read_stats["skipped"] + dataset.stats["skipped_image"]
    assert skipped == 1
    assert dataset.read_stats[f"skipped_{kind}"] == 1 or dataset.stats["skipped_image"] == 1


def test_drop_bad_images(bad_dir):
    folder, images = bad_dir
    path = folder / "mixed.json"
    path.write_text(json.dumps([CLEAN_RECORDS[0], BAD["missing_image"], BAD["corrupt_image"]]))
    with pytest.raises(DataError, match="bad-missing"):
        VisionChatDataset.from_file(path, image_folder=images).drop_bad_images(workers=2)
    kept = VisionChatDataset.from_file(path, image_folder=images, on_error="skip").drop_bad_images(workers=2)
    assert [s["id"] for s in kept.samples] == ["img-1"] and kept.read_stats["skipped_image"] == 2


def test_hf_view_serves_the_datasets_items(bad_dir):
    """The HF view (what TRL's SFTTrainer gets) returns the torch dataset's items: decoded images, and a bad image
    replaced by the next good sample under on_error="skip" (raised under "raise"), one row or a batch."""
    import datasets

    from internvl_chat.data.dataset import hf_view

    folder, images = bad_dir
    path = folder / "mixed.json"
    path.write_text(json.dumps([CLEAN_RECORDS[0], BAD["missing_image"], CLEAN_RECORDS[3]]))
    dataset = VisionChatDataset.from_file(path, image_folder=images, on_error="skip")
    view = hf_view(dataset, {"modality_length": dataset.modality_lengths})
    assert isinstance(view, datasets.Dataset) and len(view) == 3
    assert [row["id"] for row in view] == ["img-1", "cap-1", "cap-1"]
    assert view[1]["images"][0].size == (20, 16) and view[1]["modality_length"] == dataset.modality_lengths[1]
    assert [row["id"] for row in view.__getitems__([2, 0])] == ["cap-1", "img-1"]  # the DataLoader's batch fetch
    assert list(view["modality_length"]) == dataset.modality_lengths
    strict = hf_view(VisionChatDataset.from_file(path, image_folder=images))
    with pytest.raises(DataError, match="bad-missing"):
        strict[1]
    with pytest.raises(ValueError, match="modality_length"):
        hf_view(dataset, {"modality_length": [1]})


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(CLEAN_RECORDS[1]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl.*line 2"):
        read_samples(path)


# ------------------------------------------------------------------------------------------- HF datasets, meta
def test_hf_datasets_and_parquet_readers(clean, tmp_path):
    import datasets

    path, images = clean
    convert(path, tmp_path / "ds", to="datasets")
    convert(path, tmp_path / "data.parquet", to="parquet")
    reference = read_samples(path, image_folder=images)
    for target in (tmp_path / "ds", tmp_path / "data.parquet"):
        samples = read_samples(target, image_folder=images)
        assert len(samples) == 4
        for got, want in zip(samples, reference):
            assert got["id"] == want["id"] and got["images"] == want["images"]
            assert got["messages"] == want["messages"]

    # TRL-style dataset with embedded images (datasets.Image) and string content
    ds = datasets.Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Hi?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                ]
            ],
            "images": [[str(images / "b.png")]],
        }
    ).cast_column("images", datasets.List(datasets.Image()))
    ds.save_to_disk(tmp_path / "embedded")
    dataset = VisionChatDataset.from_file(tmp_path / "embedded")
    item = dataset[0]
    assert item["id"] == 0 and item["images"][0].size == (20, 16)
    assert item["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Hi?"}]


def test_internvl_meta_file(clean, tmp_path):
    path, images = clean
    many = [{**CLEAN_RECORDS[1], "id": f"t{i}"} for i in range(10)]
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps(r) for r in many))
    meta = {
        "llava": {"root": str(images), "annotation": str(path), "repeat_time": 2},
        "text": {"root": "", "annotation": "text.jsonl", "repeat_time": 0.5},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    samples = read_samples(tmp_path / "meta.json")
    ids = [s["id"] for s in samples]
    assert ids[:8] == ["img-1", "txt-1", "multi-1", "cap-1"] * 2
    assert len(ids) == 8 + 5 and len(set(ids[8:])) == 5 and all(i.startswith("t") for i in ids[8:])
    assert samples[0]["images"] == [str(images / "coco" / "a.png")]
    assert [s["id"] for s in read_samples(tmp_path / "meta.json")] == ids  # deterministic


# ------------------------------------------------------------------------------------------------ converters
@pytest.mark.parametrize("via", ["parquet", "datasets", "jsonl"])
def test_converters_round_trip(clean, tmp_path, via):
    path, _ = clean
    middle = tmp_path / {"parquet": "x.parquet", "datasets": "x_ds", "jsonl": "x.jsonl"}[via]
    assert convert(path, middle, to="llava" if via == "jsonl" else via) == 4
    back = tmp_path / "back.json"
    convert(middle, back, to="llava")
    assert read_llava_records(back) == CLEAN_RECORDS  # image paths stay relative, text exact


def test_cli_convert(clean, tmp_path, capsys):
    path, _ = clean
    assert data_main(["convert", str(path), str(tmp_path / "o.parquet"), "--to", "parquet"]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- check
def test_check_reports_every_problem(bad_dir, tmp_path):
    folder, images = bad_dir
    records = [*CLEAN_RECORDS, *BAD.values()]
    records.append(
        {"id": "empty-turn", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "Ok."}]}
    )
    records.append(
        {
            "id": "long-1",
            "image": "b.png",
            "conversations": [{"from": "human", "value": "<image>\nTell me."}, {"from": "gpt", "value": "w " * 1000}],
        }
    )
    path = folder / "mixed.json"
    path.write_text(json.dumps(records))
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "vicuna-v1.5")
    encoder = SampleEncoder.from_tokenizer(tokenizer, "vicuna_v1", image_seq_length=576, max_length=1500)
    report = check_file(path, image_folder=images, encoder=encoder, workers=2)
    assert report.total == len(records)
    counts = report.counts
    for kind in BAD:
        assert counts[kind] == 1, (kind, counts)
    assert counts["empty_turn"] == 1
    assert report.errors == len(BAD)
    flagged = {(i["kind"], str(i["id"])) for i in report.issues}
    assert ("missing_image", "bad-missing") in flagged and ("corrupt_image", "bad-corrupt") in flagged
    assert all(i["source"] == str(path) for i in report.issues)
    # Lengths: image tokens counted (576 per image); only long-1 exceeds 1500 tokens
    assert report.over_length == 1
    assert min(report.lengths) > 0 and max(report.lengths) > 1500
    assert 576 * 2 in report.image_tokens
    text = report.format()
    assert "over max_length 1500: 1 of" in text and "bad-corrupt" in text and "missing_image" in text


def test_cli_check(clean, bad_dir, tmp_path, capsys):
    path, images = clean
    plot, out = tmp_path / "len.png", tmp_path / "r.json"
    args = ["check", str(path), "--image-folder", str(images), "--tokenizer", str(TOKENIZERS / "vicuna-v1.5")]
    args += [
        "--template",
        "vicuna_v1",
        "--image-seq-length",
        "576",
        "--max-length",
        "2048",
        "--plot",
        str(plot),
        "--json",
        str(out),
    ]
    assert data_main(args) == 0
    printed = capsys.readouterr().out
    assert "4 samples, 0 with errors" in printed and "token lengths" in printed
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["over_length"] == 0 and report["max_length"] == 2048
    assert sum(row[2] for row in report["histogram"]) == 4

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([BAD["missing_image"]]))
    assert data_main(["check", str(bad), "--image-folder", str(images)]) == 1
    assert "bad-missing" in capsys.readouterr().out


def test_read_stats_counter_skip(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([CLEAN_RECORDS[1], BAD["unknown_role"], BAD["empty_conversation"]]))
    stats: Counter = Counter()
    samples = read_samples(path, on_error="skip", stats=stats)
    assert len(samples) == 1 and stats["skipped"] == 2
    assert stats["skipped_unknown_role"] == 1 and stats["skipped_empty_conversation"] == 1


def test_leading_assistant_turn_counted_by_id(tmp_path, capsys):
    """Every template drops a conversation's leading assistant turn (the original preprocessing's rule): data check
    names such samples (warning, by id in --json) and the dataset lists them for the training summary."""
    records = [
        {"id": "lead-gpt", "conversations": [{"from": "gpt", "value": "Hi."}, *CLEAN_RECORDS[1]["conversations"]]},
        {"id": "normal", "conversations": CLEAN_RECORDS[1]["conversations"]},
    ]
    path, out = tmp_path / "lead.json", tmp_path / "r.json"
    path.write_text(json.dumps(records))
    assert data_main(["check", str(path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    flagged = [(i["kind"], i["id"], i["severity"]) for i in report["issues"] if i["kind"] == "leading_assistant"]
    assert flagged == [("leading_assistant", "lead-gpt", "warning")] and report["errors"] == 0
    assert report["counts"]["leading_assistant"] == 1
    assert VisionChatDataset.from_file(path).leading_assistant_ids() == ["lead-gpt"]

"""Data-parallel inference (issue 20): the sharding module's rule (round-robin shares, per-process parts, merge order,
resume across world sizes, torn lines), and -- slow -- `eval` and `caption` under `torchrun` with 2 CPU processes
(gloo) giving the bytes of a single-process run, also after a process was killed mid-way and the run resumed with 2
processes or with 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TOKENIZERS
from internvl_chat.data import sharding
from internvl_chat.data.sharding import (
    EXIT_AFTER_ENV,
    Ranks,
    ShardedJsonl,
    append_jsonl,
    launch_state,
    ordered_by,
    part_path,
    part_paths,
    read_jsonl,
    shard,
)


# ------------------------------------------------------------------------------------------------ the rule
def test_shard_is_round_robin_disjoint_and_balanced():
    items = list(range(11))
    for world in (1, 2, 3, 8, 16):
        shares = [shard(items, r, world) for r in range(world)]
        assert sorted(x for s in shares for x in s) == items  # every item once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(s == items[r::world] for r, s in enumerate(shares))
    assert shard(items, 1, 3) == [1, 4, 7, 10]
    assert shard([], 0, 4) == []
    with pytest.raises(ValueError, match="rank 2"):
        shard(items, 2, 2)


def test_part_paths_by_rank_number(tmp_path):
    path = tmp_path / "p[1].jsonl"  # glob characters in the name are taken literally
    for rank in (10, 2, 0):
        Path(part_path(path, rank)).write_text("")
    (tmp_path / "p[1].jsonl.rank3.tmp").write_text("")
    (tmp_path / "p[1].jsonl.rankx").write_text("")
    assert [Path(p).name for p in part_paths(path)] == ["p[1].jsonl.rank0", "p[1].jsonl.rank2", "p[1].jsonl.rank10"]


def test_torn_last_line_is_skipped_and_the_next_append_starts_a_fresh_line(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"id": "a"}])
    with open(path, "a") as f:
        f.write('{"id": "b", "te')  # killed mid-write
    assert read_jsonl(path) == [{"id": "a"}]
    assert "x.jsonl:2: ignoring an unreadable line" in caplog.text
    append_jsonl(path, [{"id": "c"}, {"id": "d"}])
    assert read_jsonl(path) == [{"id": "a"}, {"id": "c"}, {"id": "d"}]  # "c" not glued onto the torn line
    (tmp_path / "y.jsonl").write_text('[1, 2]\n"text"\n{"id": "e"}\n\n')
    assert read_jsonl(tmp_path / "y.jsonl") == [{"id": "e"}]  # only JSON objects are records


def _record(item: int) -> dict:
    return {"id": f"q{item}", "text": f"answer {item * 7 % 5}"}


def _key(record: dict) -> str:
    return record["id"]


def test_merge_puts_every_part_in_the_callers_order(tmp_path):
    path = tmp_path / "preds.jsonl"
    items = list(range(9))
    for rank in range(3):
        store = ShardedJsonl(path, _key, Ranks(rank=rank, world_size=3))
        assert store.own_path == part_path(path, rank)
        mine = shard(items, rank, 3)
        store.append([_record(i) for i in reversed(mine)])  # any order inside a part
    assert not path.exists() and len(part_paths(path)) == 3
    keys = [f"q{i}" for i in items]
    merged = ShardedJsonl(path, _key).merge(ordered_by(keys))
    assert list(merged) == keys and part_paths(path) == []
    assert path.read_text() == "".join(json.dumps(_record(i)) + "\n" for i in items)


def test_later_line_wins_keeps_first_place_and_unknown_keys_go_last(tmp_path):
    path = tmp_path / "preds.jsonl"
    append_jsonl(path, [{"id": "x", "text": "old"}, {"id": "q1", "text": "1"}])
    append_jsonl(part_path(path, 0), [{"id": "x", "text": "new"}, {"no_key": 1}, {"id": "q0", "text": "0"}])
    store = ShardedJsonl(path, _key)
    assert store.read() == {
        "x": {"id": "x", "text": "new"},
        "q1": {"id": "q1", "text": "1"},
        "q0": {"id": "q0", "text": "0"},
    }
    store.merge(ordered_by(["q0", "q1"]))
    assert [r["id"] for r in read_jsonl(path)] == ["q0", "q1", "x"]


def test_merge_without_order_or_parts_leaves_the_file_alone(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "lo')  # a torn line stays until there is something to merge
    before = path.read_bytes()
    assert list(ShardedJsonl(path, _key).merge()) == ["a"]
    assert path.read_bytes() == before
    append_jsonl(part_path(path, 1), [{"id": "c"}])
    ShardedJsonl(path, _key).merge()
    assert path.read_text() == '{"id": "a"}\n{"id": "c"}\n' and not part_paths(path)


def _straight(path: Path, items: list[int]) -> bytes:
    store = ShardedJsonl(path, _key)
    store.append([_record(i) for i in items])
    store.merge(ordered_by([f"q{i}" for i in items]))
    return path.read_bytes()


def _resume(path: Path, items: list[int], world: int, stop_after: int | None = None) -> None:
    """One attempt of a job with ``world`` processes: read, shard what is left, append (each process stops after
    ``stop_after`` records when given: a killed run), then merge unless killed."""
    done = ShardedJsonl(path, _key, Ranks(rank=0, world_size=world)).read()
    pending = [i for i in items if f"q{i}" not in done]
    for rank in range(world):
        store = ShardedJsonl(path, _key, Ranks(rank=rank, world_size=world))
        mine = shard(pending, rank, world)[:stop_after]
        for i in sorted(mine, key=lambda i: -i):  # each process orders its own share (eval: by length)
            store.append([_record(i)])
    if stop_after is None:
        ShardedJsonl(path, _key).merge(ordered_by([f"q{i}" for i in items]))


@pytest.mark.parametrize("worlds", [(2, 2), (2, 1), (1, 3), (4, 2, 1), (3, 8)])
def test_resume_across_world_sizes_gives_the_straight_file(tmp_path, worlds):
    items = list(range(13))
    expected = _straight(tmp_path / "straight.jsonl", items)
    path = tmp_path / "preds.jsonl"
    for world in worlds[:-1]:
        _resume(path, items, world, stop_after=2)  # killed after 2 records per process
        with open(part_path(path, 0) if world > 1 else path, "a") as f:
            f.write('{"id": "q12", "te')  # the kill tore a line
    done = ShardedJsonl(path, _key).read()
    assert 0 < len(done) < len(items)
    _resume(path, items, worlds[-1])
    assert path.read_bytes() == expected and not part_paths(path)


def test_plain_run_is_rank_0_of_1_without_a_process_group(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = launch_state("cpu")
    assert (ranks.rank, ranks.world_size, ranks.is_main, ranks.device, ranks.state) == (0, 1, True, None, None)
    ranks.barrier()  # no-ops
    assert ranks.gather({"a": 1}) == [{"a": 1}]
    assert sharding.log_level() == 20
    monkeypatch.setenv("RANK", "3")
    assert sharding.log_level() == 30


def test_exit_hook_is_off_unless_set(tmp_path, monkeypatch):
    monkeypatch.delenv(EXIT_AFTER_ENV, raising=False)
    store = ShardedJsonl(tmp_path / "a.jsonl", _key)
    store.append([_record(i) for i in range(5)])
    assert store.appended == 5 and store.exit_after is None


# --------------------------------------------------------------------------- torchrun, 2 CPU processes (slow)
def _image(seed: int, h: int, w: int = 36) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from internvl_chat.factories import create

    folder = tmp_path_factory.mktemp("sharding") / "llava-tiny"
    create("llava-v1.5-7b", str(folder), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    return folder


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (EXIT_AFTER_ENV, "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nproc: int, args: list[str], cwd: Path, launcher: str = "torchrun", **env) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "internvl_chat.cli", *args]
    elif launcher == "accelerate":
        run = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc)]
        run += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        run += ["--main_process_port", str(_free_port())]
        cmd = [*run, "-m", "internvl_chat.cli", *args]
    else:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        cmd = [*run, "-m", "internvl_chat.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode != 0, proc.stderr[-3000:]  # the exit hook's SIGKILL ended the run


def _eval_data(root: Path, n: int = 10) -> list[str]:
    images = root / "images"
    images.mkdir(parents=True)
    rows, ann = [], []
    for i in range(n):
        _image(i, h=20 + 5 * i).save(images / f"{i}.jpg")
        question = "what is written here" + " please" * (i % 4) + "?"  # prompt lengths differ: the sort matters
        rows.append({"question_id": f"img{i}", "image": f"{i}.jpg", "text": f"{question}\nReference OCR token: stop"})
        ann.append({"image_id": f"img{i}", "question": question, "answers": ["stop"] * 10, "question_id": 100 + i})
    (root / "ann.json").write_text(json.dumps({"data": ann}))
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--data", str(root / "q.jsonl"), "--image-folder", str(images), "--annotations", str(root / "ann.json")]


EVAL_FILES = ("textvqa/predictions.jsonl", "textvqa/scores.json", "scores.json", "report.md")


@pytest.mark.slow
def test_eval_two_processes_and_resumes_give_the_single_process_bytes(model_dir, tmp_path):
    from internvl_chat.eval.run import main as eval_main

    data = _eval_data(tmp_path / "data")
    common = ["--model", str(model_dir), "--task", "textvqa", *data, "--batch-size", "3", "--max-new-tokens", "4"]
    common += ["--num-workers", "1", "--device", "cpu"]

    def args(name: str) -> list[str]:
        return ["eval", *common, "--output", str(tmp_path / name)]

    def same_as_single(name: str) -> None:
        for file in EVAL_FILES:
            assert (tmp_path / name / file).read_bytes() == (tmp_path / "one" / file).read_bytes(), (name, file)
        assert not part_paths(tmp_path / name / "textvqa" / "predictions.jsonl")

    assert eval_main(args("one")[1:]) == 0  # the single-process reference, in this process
    assert len((tmp_path / "one" / "textvqa" / "predictions.jsonl").read_text().splitlines()) == 10

    _ok(_launch(2, args("two"), tmp_path))
    same_as_single("two")
    speed = json.loads((tmp_path / "two" / "textvqa" / "speed.json").read_text())
    assert speed["world_size"] == 2 and [s["questions"] for s in speed["per_rank"]] == [5, 5]
    _ok(_launch(2, args("accelerate"), tmp_path, launcher="accelerate"))  # the other launcher training uses
    same_as_single("accelerate")
    assert json.loads((tmp_path / "accelerate" / "textvqa" / "speed.json").read_text())["world_size"] == 2

    # Killed after the first batch of each process (3 answers each), resumed with 2 processes.
    preds = tmp_path / "kill2" / "textvqa" / "predictions.jsonl"
    _killed(_launch(2, args("kill2"), tmp_path, **{EXIT_AFTER_ENV: "3"}))
    parts = part_paths(preds)
    assert parts and not preds.exists() and all(len(read_jsonl(p)) == 3 for p in parts)
    with open(parts[-1], "a") as f:
        f.write('{"question_id": "img9", "te')  # a torn last line
    _ok(_launch(2, args("kill2"), tmp_path))
    same_as_single("kill2")

    # Killed with 2 processes, resumed by a single one (this process).
    _killed(_launch(2, args("kill21"), tmp_path, **{EXIT_AFTER_ENV: "3"}))
    assert part_paths(tmp_path / "kill21" / "textvqa" / "predictions.jsonl")
    assert eval_main(args("kill21")[1:]) == 0
    same_as_single("kill21")

    # Killed as a single process (answers in predictions.jsonl itself), resumed with 2.
    _killed(_launch(1, args("kill12"), tmp_path, **{EXIT_AFTER_ENV: "3"}))
    assert len(read_jsonl(tmp_path / "kill12" / "textvqa" / "predictions.jsonl")) == 3
    _ok(_launch(2, args("kill12"), tmp_path))
    same_as_single("kill12")


def _caption_folder(root: Path) -> Path:
    """9 distinct images, a renamed copy of one (same content: captioned once) and a corrupt file."""
    root.mkdir(parents=True)
    for i in range(9):
        _image(50 + i, h=24 + 3 * i).save(root / f"img{i}.png")
    (root / "sub").mkdir()
    (root / "sub" / "copy_of_img4.png").write_bytes((root / "img4.png").read_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_caption_two_processes_and_resumes_give_the_single_process_bytes(model_dir, tmp_path, suffix):
    from internvl_chat.data.caption import main as caption_main

    images = _caption_folder(tmp_path / "images")
    common = [str(images), "--model", str(model_dir), "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu"]

    def args(name: str) -> list[str]:
        return ["caption", *common, "--output", str(tmp_path / (name + suffix))]

    def same_as_single(name: str, proc=None) -> None:
        out = tmp_path / (name + suffix)
        assert out.read_bytes() == (tmp_path / ("one" + suffix)).read_bytes(), name
        assert not list(tmp_path.glob(f"{name}{suffix}.partial.jsonl*"))
        if proc is not None:
            stats = json.loads(proc.stdout)
            assert stats["total_records"] == 9 and stats["unreadable"] == 1

    assert caption_main(args("one")[1:]) == 0
    records = _read_caption_output(tmp_path / ("one" + suffix))
    assert len(records) == 9 and [r["image"] for r in records] == [f"img{i}.png" for i in range(9)]

    proc = _launch(2, args("two"), tmp_path)
    _ok(proc)
    same_as_single("two", proc)
    assert json.loads(proc.stdout)["duplicate"] == 1 and json.loads(proc.stdout)["captioned"] == 9

    partial = tmp_path / f"kill2{suffix}.partial.jsonl"
    _killed(_launch(2, args("kill2"), tmp_path, **{EXIT_AFTER_ENV: "2"}))
    assert part_paths(partial) and not (tmp_path / f"kill2{suffix}").exists()
    with open(part_paths(partial)[0], "a") as f:
        f.write('{"id": "torn')
    _ok(_launch(2, args("kill2"), tmp_path))
    same_as_single("kill2")

    _killed(_launch(2, args("kill21"), tmp_path, **{EXIT_AFTER_ENV: "2"}))
    assert caption_main(args("kill21")[1:]) == 0
    same_as_single("kill21")


def _read_caption_output(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.suffix == ".json" else read_jsonl(path)

"""The `internvl-chat` console script: one-line errors (exit 2) for ordinary mistakes in every verb, `--debug` for the
traceback, `--help` before any heavy import, and the README's Python snippet running as pasted."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOKENIZERS
from internvl_chat.cli import main

ROOT = Path(__file__).parent.parent
TINY = ROOT / "recipes" / "tiny"


def one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from internvl_chat.factories import create

    out = tmp_path_factory.mktemp("tiny") / "model"
    create("llava-v1.5-7b", str(out), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    return out


def test_missing_recipe(capsys, tmp_path):
    one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml")


def test_override_typo_names_the_closest_key(capsys):
    line = one_line_error(
        capsys, ["train", str(TINY / "llava-align.yaml"), "--learning_rat", "1e-3"], "--learning_rat"
    )
    assert "did you mean --training.learning_rate?" in line
    line = one_line_error(capsys, ["train", str(TINY / "llava-align.yaml"), "--training.learnin_rate", "1"])
    assert "--training.learning_rate" in line


def test_yaml_syntax_error(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    one_line_error(capsys, ["train", str(bad)])


def test_missing_stage1_projector(capsys, tmp_path):
    argv = ["train", str(TINY / "llava-finetune.yaml"), "--model.tokenizer", str(TOKENIZERS / "vicuna-v1.5")]
    argv += ["--pretrain_mm_mlp_adapter", str(tmp_path / "mm_projector.safetensors"), "--output_dir", str(tmp_path)]
    one_line_error(capsys, argv, "mm_projector.safetensors", "align")


def test_eval_missing_data(capsys, tiny_folder, tmp_path):
    argv = ["eval", "--model", str(tiny_folder), "--task", "textvqa", "--data", str(tmp_path / "missing.jsonl")]
    one_line_error(capsys, argv + ["--output", str(tmp_path / "ev")], "missing.jsonl")


def test_push_offline(capsys, tiny_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(capsys, ["push", str(tiny_folder), "--repo-id", "me/tiny"], "offline")


def test_create_bad_tokenizer(capsys, tmp_path):
    argv = ["create", "--preset", "llava-v1.5-7b", "--tiny", "--output", str(tmp_path / "m")]
    one_line_error(capsys, argv + ["--tokenizer", str(tmp_path / "no-tokenizer")], "no-tokenizer")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])
    monkeypatch.setenv("INTERNVL_CHAT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", str(tmp_path / "nope.yaml")])


def test_unknown_verb_and_usage(capsys):
    assert main(["trian"]) == 2
    assert "unknown verb 'trian'" in capsys.readouterr().err
    assert main([]) == 0
    assert "--debug" in capsys.readouterr().out


def test_program_errors_keep_their_traceback(monkeypatch):
    """Only user-error types become one line; a bug (here a RuntimeError) still raises."""
    from internvl_chat.hub import create

    def broken(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(create, "main", broken)
    with pytest.raises(RuntimeError):
        main(["create", "--preset", "llava-v1.5-7b", "--output", "x"])


# Verbs whose modules import torch / transformers only after parsing.
LIGHT_VERBS = [
    "demo",
    "data",
    "train",
    "eval",
    "push",
    "select",
    "caption",
    "create",
    "convert",
    "export",
    "chat",
    "web",
]


@pytest.mark.parametrize("verb", LIGHT_VERBS)
def test_help_imports_no_heavy_module(verb):
    code = (
        "import sys; sys.argv = ['internvl-chat']\n"
        "from internvl_chat.cli import main\n"
        "try:\n"
        f"    main([{verb!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "usage: internvl-chat" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_select_metric_names_match_the_scorers():
    from internvl_chat.data.scoring import METRICS
    from internvl_chat.data.select import METRIC_NAMES

    assert sorted(METRIC_NAMES) == sorted(METRICS)


def test_readme_use_snippet_runs_as_pasted(tiny_folder, tmp_path, monkeypatch):
    """The README's Use snippet, after the demo: `demo-out/finetune` and a held-out image of `demo-out/data`."""
    import shutil

    from PIL import Image

    text = (ROOT / "README.md").read_text()
    use = text[text.index("## Use") :]
    snippet = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_folder, "demo-out/finetune")
    os.makedirs("demo-out/data/images")
    Image.new("RGB", (8, 8), "white").save("demo-out/data/images/digit_1500.png")
    scope = {}
    exec(compile(snippet, "README.md (Use)", "exec"), scope)
    assert isinstance(scope["answer"][0], str)


def test_dry_run_of_a_full_size_recipe_downloads_nothing(capsys, monkeypatch):
    """7B shapes on the meta device from the preset config: the trainable table, offline, without any weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = ROOT / "recipes" / "llava-v1.5-7b-finetune.yaml"
    argv = ["train", str(recipe), "--model.tokenizer", str(TOKENIZERS / "vicuna-v1.5"), "--dry-run"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "language model | 6,607,605,760 | 6,607,605,760" in table
    assert "vision tower   |             0 |   303,507,456" in table


def test_weight_files_get_the_umask_mode(tiny_folder, tmp_path, tiny_model):
    """safetensors >= 0.8 writes through a private (0600) temporary file; saved weights get 0666 minus the umask."""
    from internvl_chat.training.trainer import save_projector

    umask = os.umask(0)
    os.umask(umask)
    assert (tiny_folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    path = save_projector(tiny_model, tmp_path)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask

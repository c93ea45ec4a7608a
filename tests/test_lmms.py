"""lmms-eval adapter `internvl_chat` (internvl_chat.eval.lmms) and the `internvl-chat lmms-eval` launcher, offline on
a tiny random model and a local parquet task: lmms-eval's real CLI, batch invariance, the same answers as our own
runner, likelihood scoring on the training-label rule, interleaved images, multi-round requests."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TOKENIZERS

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'internvl-chat[lmms]')")

ROOT = Path(__file__).resolve().parents[1]
POST_PROMPT = "\nAnswer the question using a single word or phrase."
N_DOCS = 6


def _image(seed: int, h: int, w: int = 30) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _question(i: int) -> str:
    return "what is written here" + " please" * (i % 4) + "?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaVA folder and a local lmms-eval task (parquet via data_files, a utils.py for the visuals)."""
    import datasets

    from internvl_chat.factories import create

    root = tmp_path_factory.mktemp("lmms")
    model_dir = root / "llava-tiny"
    create("llava-v1.5-7b", str(model_dir), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    task_dir = root / "task"
    task_dir.mkdir()
    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    data = {
        "image": [_image(i, 20 + 5 * i) for i in range(N_DOCS)],
        "question": [_question(i) for i in range(N_DOCS)],
        "answer": ["stop"] * N_DOCS,
    }
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(task_dir / "data.parquet"))
    (task_dir / "utils.py").write_text(
        textwrap.dedent(
            f"""
            def doc_to_visual(doc):
                return [doc["image"].convert("RGB")]

            def doc_to_text(doc, lmms_eval_specific_kwargs=None):
                return doc["question"] + {POST_PROMPT!r}
            """
        )
    )
    (task_dir / "tinyvqa.yaml").write_text(
        textwrap.dedent(
            f"""
            task: tinyvqa
            dataset_path: parquet
            dataset_kwargs:
              data_files:
                test: {task_dir / "data.parquet"}
            test_split: test
            output_type: generate_until
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: !function utils.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 5
              until:
                - "ASSISTANT:"
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return model_dir, task_dir


def _cli_start(model_dir, task_dir, out, batch_size, launcher=("-m", "internvl_chat.cli", "lmms-eval")):
    """Starts one lmms-eval command line run (a subprocess) on the local task."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, *launcher, "--model", "internvl_chat", "--model_args", f"pretrained={model_dir}"]
    cmd += ["--device", "cpu", "--tasks", "tinyvqa", "--include_path", str(task_dir), "--batch_size", str(batch_size)]
    cmd += ["--output_path", str(out), "--log_samples"]
    out.mkdir(parents=True, exist_ok=True)
    return out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out, env=env)


def _cli_finish(run):
    """{doc_id: answer} of a finished run, from lmms-eval's samples file."""
    out, proc = run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "|tinyvqa|" in stdout  # lmms-eval's results table
    (samples,) = list(Path(out).rglob("*_samples_tinyvqa.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return {r["doc_id"]: r["filtered_resps"] for r in rows}


def _cli_answers(*args, **kwargs):
    return _cli_finish(_cli_start(*args, **kwargs))


def _runner_answers(model_dir, batch_size=1):
    """The same questions through `internvl-chat eval`'s runner directly."""
    import tempfile

    from internvl_chat.eval.runner import generate_predictions, load_model
    from internvl_chat.eval.tasks import Sample

    model, processor = load_model(str(model_dir), device="cpu")
    samples = [Sample(id=i, prompt=_question(i) + POST_PROMPT, image=_image(i, 20 + 5 * i)) for i in range(N_DOCS)]
    with tempfile.TemporaryDirectory() as tmp:
        texts, _ = generate_predictions(
            model, processor, samples, Path(tmp) / "p.jsonl", batch_size=batch_size, max_new_tokens=5
        )
    return {i: texts[str(i)] for i in range(N_DOCS)}


def test_lmms_eval_cli_batch_4_equals_batch_1_and_our_runner(setup, tmp_path):
    """`internvl-chat lmms-eval` (lmms-eval's own CLI, our adapter registered) on a local parquet task: batch 4
    gives the answers of batch 1, and both are `internvl-chat eval`'s runner's answers for the same prompts."""
    model_dir, task_dir = setup
    # Both runs at once (each is mostly single-threaded start-up).
    runs = [_cli_start(model_dir, task_dir, tmp_path / f"b{b}", b) for b in (4, 1)]
    four, one = [_cli_finish(run) for run in runs]
    assert sorted(four) == list(range(N_DOCS))
    assert four == one
    assert four == _runner_answers(model_dir)
    assert len(set(four.values())) > 1  # the images matter (a constant answer would hide a dropped image)


@pytest.mark.slow
def test_python_m_launcher_and_lmms_evals_own_entry_point(setup, tmp_path):
    """`python -m internvl_chat.eval.lmms_cli` and, where the package's entry point is installed, lmms-eval's own
    `python -m lmms_eval --model internvl_chat` give the same answers."""
    from importlib.metadata import entry_points

    model_dir, task_dir = setup
    base = _cli_answers(model_dir, task_dir, tmp_path / "m", 2, launcher=("-m", "internvl_chat.eval.lmms_cli"))
    assert base == _runner_answers(model_dir)
    if not [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "internvl_chat"]:
        pytest.skip("the package's lmms_eval.models entry point is not installed (pip install -e '.[lmms]')")
    assert _cli_answers(model_dir, task_dir, tmp_path / "own", 3, launcher=("-m", "lmms_eval")) == base


@pytest.mark.slow
def test_lmms_eval_openai_model_against_our_server(setup, tmp_path):
    """lmms-eval's `--model openai` against `internvl-chat serve`: the same answers as the in-process adapter."""
    import socket
    import time
    import urllib.request

    model_dir, task_dir = setup
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": "none"}
    server = subprocess.Popen(
        [sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(model_dir), "--port", str(port)]
        + ["--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        out = tmp_path / "openai"
        cmd = [sys.executable, "-m", "lmms_eval", "--model", "openai", "--model_args"]
        cmd += [f"model={model_dir.name},base_url=http://127.0.0.1:{port}/v1,api_key=none", "--tasks", "tinyvqa"]
        cmd += ["--include_path", str(task_dir), "--output_path", str(out), "--log_samples"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    (samples,) = list(out.rglob("*_samples_tinyvqa.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    assert {r["doc_id"]: r["filtered_resps"] for r in rows} == _runner_answers(model_dir)


# ---- the adapter in-process ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(setup):
    from internvl_chat.eval.lmms import InternVLChat

    model_dir, _ = setup
    lm = InternVLChat(pretrained=str(model_dir), device="cpu", batch_size=2)
    return lm


class _Docs:
    """lmms-eval's `task_dict[task][split]`: documents by id."""

    def __init__(self, docs):
        self.docs = docs

    def __getitem__(self, i):
        return self.docs[i]


def _instance(kind, args, doc_id=0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def _visual(doc):
    return doc["images"]


def test_generate_until_cuts_at_until_and_matches_runner(adapter, setup):
    docs = [{"images": [_image(i, 20 + 5 * i)]} for i in range(3)]
    adapter.task_dict = {"t": {"test": _Docs(docs)}}
    gen = {"max_new_tokens": 5, "until": ["ASSISTANT:"]}
    requests = [
        _instance("generate_until", (_question(i) + POST_PROMPT, dict(gen), _visual, i, "t", "test")) for i in range(3)
    ]
    answers = adapter.generate_until(requests)
    assert answers == [_runner_answers(setup[0])[i] for i in range(3)]
    # A stop string from the task cuts the answer where it first occurs.
    word = answers[0].split()[1] if len(answers[0].split()) > 1 else answers[0][1:]
    cut = adapter.generate_until(
        [_instance("generate_until", (requests[0].args[0], {**gen, "until": [word]}, _visual, 0, "t", "test"))]
    )
    assert cut == [answers[0][: answers[0].index(word)]]


def test_interleaved_images_and_task_written_placeholder(adapter):
    """Several images go where the task's `<image>` placeholders are (one processor call); a single leading
    `<image>\\n` is the template's own place for the image (same answer as without it)."""
    import torch

    a, b = _image(1, 30), _image(2, 40)
    docs = [{"images": [a, b]}, {"images": [a]}, {"images": [a]}]
    adapter.task_dict = {"t": {"test": _Docs(docs)}}
    gen = {"max_new_tokens": 4}
    two = "First <image> then <image> which differs?"
    got = adapter.generate_until(
        [
            _instance("generate_until", (two, dict(gen), _visual, 0, "t", "test")),
            _instance("generate_until", ("<image>\nwhat is it?", dict(gen), _visual, 1, "t", "test"), 1),
            _instance("generate_until", ("what is it?", dict(gen), _visual, 2, "t", "test"), 2),
        ]
    )
    assert got[1] == got[2]
    processor, model = adapter.processor, adapter.model
    content = [
        {"type": "text", "text": "First "},
        {"type": "image"},
        {"type": "text", "text": " then "},
        {"type": "image"},
        {"type": "text", "text": " which differs?"},
    ]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert prompt.count("<image>") == 2
    inputs = processor(images=[[a, b]], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        new = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert got[0] == processor.post_process_image_text_to_text(new)[0]
    with pytest.raises(ValueError, match="placeholders"):
        adapter.generate_until(
            [_instance("generate_until", ("<image> <image> <image>", dict(gen), _visual, 0, "t", "test"))]
        )


def _reference_score(lm, context, continuation, image=None):
    """(mean NLL, greedy) over the tokens of the processor's assistant mask (TRL's assistant_only_loss source),
    computed apart from the adapter."""
    import torch

    user = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": context}]
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": continuation}]},
    ]
    enc = lm.processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    mask = torch.as_tensor(enc["assistant_masks"][0]).bool()
    assert mask.sum() >= 2  # answer + terminator
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in enc}
    with torch.inference_mode():
        logits = lm.model(**inputs).logits[0].float()
    ids, positions = enc["input_ids"][0], mask.nonzero()[:, 0]
    logprobs = torch.log_softmax(logits[positions - 1], -1).gather(-1, ids[positions][:, None])[:, 0]
    return float(-logprobs.mean()), bool((logits[positions - 1].argmax(-1) == ids[positions]).all())


def test_loglikelihood_scores_the_supervised_answer_tokens(adapter):
    """The score is the mean NLL over exactly the tokens training supervises for that answer (the processor's
    assistant mask: separator, answer, terminator), and `greedy` says whether argmax reproduces them."""
    image = _image(3, 28)
    adapter.task_dict = {"t": {"test": _Docs([{"images": []}, {"images": [image]}])}}
    got = adapter.loglikelihood(
        [
            _instance("loglikelihood", ("Is the sky blue?", " Yes", _visual, 0, "t", "test")),
            _instance("loglikelihood", ("Name it.", " cat", _visual, 1, "t", "test"), 1),
        ]
    )
    for (loss, greedy), (ref_loss, ref_greedy) in zip(
        got,
        [_reference_score(adapter, "Is the sky blue?", " Yes"), _reference_score(adapter, "Name it.", " cat", image)],
    ):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and greedy == ref_greedy


# The other families: InternViT-6B tower (vicuna_v1), LLaVAR-2 multi-path with phi3_instruct and llama3 (double BOS).
FAMILIES = [
    ("internvl-chat-vit6b-224to336-vicuna-7b", "vicuna-v1.5"),
    ("llavar2-phi3.5-mini", "phi-3.5-mini"),
    ("llavar2-llama3.1-8b", "llama-3.1"),
]


@pytest.mark.parametrize("preset,tokenizer", FAMILIES)
def test_other_families_generate_and_score_like_ours(preset, tokenizer, tmp_path):
    import tempfile

    from internvl_chat.eval.lmms import InternVLChat
    from internvl_chat.eval.runner import generate_predictions
    from internvl_chat.eval.tasks import Sample
    from internvl_chat.factories import create

    folder = tmp_path / preset
    create(preset, str(folder), tokenizer=str(TOKENIZERS / tokenizer), tiny=True)
    lm = InternVLChat(pretrained=str(folder), device="cpu", batch_size=3)
    docs = [{"images": [_image(i, 20 + 7 * i)]} for i in range(3)]
    lm.task_dict = {"t": {"test": _Docs(docs)}}
    gen = {"max_new_tokens": 4}
    questions = [_question(i) + POST_PROMPT for i in range(3)]
    got = lm.generate_until(
        [_instance("generate_until", (q, dict(gen), _visual, i, "t", "test"), i) for i, q in enumerate(questions)]
    )
    samples = [Sample(id=i, prompt=q, image=docs[i]["images"][0]) for i, q in enumerate(questions)]
    with tempfile.TemporaryDirectory() as tmp:
        texts, _ = generate_predictions(lm.model, lm.processor, samples, Path(tmp) / "p.jsonl", 1, max_new_tokens=4)
    assert got == [texts[str(i)] for i in range(3)]
    ((loss, greedy),) = lm.loglikelihood([_instance("loglikelihood", ("Name it.", " cat", _visual, 0, "t", "test"))])
    ref_loss, ref_greedy = _reference_score(lm, "Name it.", " cat", docs[0]["images"][0])
    assert loss == pytest.approx(ref_loss, rel=1e-5) and greedy == ref_greedy


def test_loglikelihood_sees_the_image(adapter):
    adapter.task_dict = {"t": {"test": _Docs([{"images": [_image(3, 28)]}, {"images": [_image(4, 44)]}])}}
    results = adapter.loglikelihood(
        [
            _instance("loglikelihood", ("Name it.", " cat", _visual, 0, "t", "test")),
            _instance("loglikelihood", ("Name it.", " dog house", _visual, 0, "t", "test")),
            _instance("loglikelihood", ("Name it.", " cat", _visual, 1, "t", "test"), 1),
        ]
    )
    assert all(isinstance(loss, float) and loss > 0 and isinstance(g, bool) for loss, g in results)
    assert results[0][0] != results[1][0] and results[0][0] != results[2][0]


def test_image_paths_and_unconditional_choice_requests(adapter, tmp_path):
    """A visual given as an image path reads like the image itself; lmms-eval's two-argument (context-free)
    likelihood requests of acc_mutual_info tasks score too."""
    image = _image(7, 33)
    image.save(tmp_path / "a.png")
    adapter.task_dict = {"t": {"test": _Docs([{"images": [str(tmp_path / "a.png")]}, {"images": [image]}])}}
    gen = {"max_new_tokens": 4}
    by_path, by_image = adapter.generate_until(
        [_instance("generate_until", ("What is it?", dict(gen), _visual, d, "t", "test"), d) for d in (0, 1)]
    )
    assert by_path == by_image
    ((loss, greedy),) = adapter.loglikelihood([_instance("loglikelihood", ("", " cat"))])
    assert loss > 0 and isinstance(greedy, bool)


def test_multi_round_feeds_each_rounds_answer_back(adapter):
    docs = [{"images": [_image(5, 30)]}, {"images": [_image(6, 30)]}]
    adapter.task_dict = {"t": {"test": _Docs(docs)}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, list(previous_output), None
        return None, f"And then, after {previous_output[-1]!r}?", False, None, {"round": round_idx}

    requests = [
        _instance(
            "generate_until_multi_round",
            ("What is it?", {"max_new_tokens": 3}, _visual, doc_to_text, i, "t", "test"),
            i,
        )
        for i in range(2)
    ]
    results = adapter.generate_until_multi_round(requests)
    assert [len(r) for r in results] == [2, 2]
    first = adapter.generate_until(
        [_instance("generate_until", ("What is it?", {"max_new_tokens": 3}, _visual, 0, "t", "test"))]
    )
    assert results[0][0] == first[0]
    assert [s[0] for s in seen] == [1, 1, 2, 2]
    assert seen[2][2] == {"round": 1}


def test_bad_model_args_and_visuals(setup, adapter):
    from internvl_chat.eval.lmms import InternVLChat

    with pytest.raises(ValueError, match="unknown --model_args conv_template"):
        InternVLChat(pretrained=str(setup[0]), conv_template="vicuna_v1")
    with pytest.raises(ValueError, match="batch_size"):
        InternVLChat(pretrained=str(setup[0]), batch_size="auto")
    adapter.task_dict = {"t": {"test": _Docs([{"images": ["clip.mp4"]}])}}
    with pytest.raises(ValueError, match="images only"):
        adapter.generate_until([_instance("generate_until", ("q", {}, _visual, 0, "t", "test"))])


def test_launcher_registers_the_adapter_and_help_is_light():
    code = (
        "import sys; sys.argv = ['internvl-chat']\n"
        "from internvl_chat.cli import main\n"
        "try:\n"
        "    main(['lmms-eval', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print([m for m in ('torch', 'transformers', 'lmms_eval') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "usage: internvl-chat lmms-eval" in proc.stdout and "--lmms-help" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"

    from lmms_eval.models import get_model

    from internvl_chat.eval.lmms import InternVLChat
    from internvl_chat.eval.lmms_cli import register

    register()
    assert get_model("internvl_chat") is InternVLChat


def test_crosscheck_agrees_where_documented_and_names_the_deviations():
    """bench/crosscheck_lmms.py, as docs/interop.md reports it: item-for-item agreement on TextVQA, ANLS and
    ChartQA; lmms-eval's POPE exact-word rule, MME lone y/n and OCRBench full-width folding differ from ours."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("crosscheck_lmms", ROOT / "bench" / "crosscheck_lmms.py")
    crosscheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crosscheck)
    for task in ("textvqa", "docvqa", "infovqa", "chartqa"):
        assert crosscheck.score(task, crosscheck.cases(task, 300))["item_agreement"] == 1.0, task
    pope = crosscheck.score(
        "pope", [{"prediction": "Yes, there is a car.", "label": "yes"}, {"prediction": "no", "label": "no"}]
    )
    assert pope["item_agreement"] == 0.5 and pope["aggregates"]["accuracy"] == {"ours": 1.0, "lmms_eval": 0.5}
    mme = crosscheck.score("mme", [{"prediction": "N", "label": "No", "category": "OCR", "image": "a"}] * 2)
    assert mme["aggregates"]["perception"] == {"ours": 0.0, "lmms_eval": 200.0}
    item = {
        "prediction": "ＳＴＯＰ",
        "answers": ["STOP"],
        "dataset_name": "IIIT5K",
        "type": "Regular Text Recognition",
    }
    assert crosscheck.score("ocrbench", [item])["aggregates"]["score_per_1000"] == {"ours": 0.0, "lmms_eval": 1000.0}


def test_launcher_failure_is_one_error_line_and_status_2(setup, tmp_path, capsys):
    """lmms-eval itself logs a failed evaluation and exits 0; `internvl-chat lmms-eval` ends with `error: ...` and
    status 2 (here: a model folder that does not exist)."""
    from internvl_chat.cli import main

    _, task_dir = setup
    args = ["lmms-eval", "--model", "internvl_chat", "--model_args", f"pretrained={tmp_path / 'missing'}"]
    args += ["--device", "cpu", "--tasks", "tinyvqa", "--include_path", str(task_dir), "--verbosity", "WARNING"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: --model ") and "is not a folder" in err

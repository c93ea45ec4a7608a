"""`internvl-chat eval` end to end on a tiny model: every input format, resume, batch invariance, judge, report."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TOKENIZERS
from internvl_chat.eval.judge import JudgeClient, JudgeError
from internvl_chat.eval.run import evaluate, main
from internvl_chat.eval.tasks import TaskContext, get_task, load_records

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from internvl_chat.eval.runner import load_model
    from internvl_chat.factories import create

    folder = tmp_path_factory.mktemp("model") / "llava-tiny"
    create("llava-v1.5-7b", str(folder), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    model, processor = load_model(str(folder), device="cpu")
    return folder, model, processor


def _image(seed: int, h: int = 24, w: int = 36) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _png(seed: int, **kw) -> bytes:
    buf = io.BytesIO()
    _image(seed, **kw).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _textvqa_fixture(root: Path, n: int = 6) -> dict:
    images = root / "images"
    images.mkdir(parents=True)
    rows, ann = [], []
    for i in range(n):
        _image(i, h=20 + 5 * i).save(images / f"{i}.jpg")
        question = "what is written here" + " please" * (i % 4) + "?"
        rows.append(
            {
                "question_id": f"img{i}",
                "image": f"{i}.jpg",
                "text": f"{question}\nReference OCR token: stop, sign\n"
                "Answer the question using a single word or phrase.",
            }
        )
        ann.append({"image_id": f"img{i}", "question": question, "answers": ["stop"] * 10, "question_id": 100 + i})
    (root / "ann.json").write_text(json.dumps({"data": ann}))
    return {
        "data": str(_jsonl(root / "q.jsonl", rows)),
        "image_folder": str(images),
        "annotations": str(root / "ann.json"),
    }


def _run(tiny, task, out, **kw):
    folder, model, processor = tiny
    kw.setdefault("max_new_tokens", NEW_TOKENS)
    return evaluate(task, output=str(out), model=model, processor=processor, num_workers=2, **kw)


# ------------------------------------------------------------------------------------------ LLaVA jsonl + folder
def test_llava_jsonl_end_to_end_with_report(tiny, tmp_path):
    fx = _textvqa_fixture(tmp_path / "data")
    result = _run(tiny, "textvqa", tmp_path / "out", batch_size=4, compare="seed", reference="llava-v1.5-7b", **fx)
    assert result["count"] == 6 and 0.0 <= result["main"] <= 100.0
    lines = [json.loads(x) for x in (tmp_path / "out" / "textvqa" / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [f"img{i}" for i in range(6)]  # question-file order
    # LLaVA's answer-file fields (LLaVA's review scripts read answer_id)
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert len({r["answer_id"] for r in lines}) == 6
    assert lines[0]["prompt"].endswith("Answer the question using a single word or phrase.")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| textvqa |" in report and "58.2" in report  # the seed's TextVQA beside ours
    assert (tmp_path / "out" / "scores.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["tasks"]["textvqa"]["count"] == 6

    # Without OCR lines: the prompt loses the OCR line, ground truth still joins.
    no_ocr = get_task("textvqa_no_ocr").read(TaskContext(**fx))
    assert "Reference OCR token" not in no_ocr[0].prompt and no_ocr[0].target == ["stop"] * 10


def test_interrupt_and_rerun_gives_the_same_files(tiny, tmp_path, monkeypatch):
    fx = _textvqa_fixture(tmp_path / "data")
    _run(tiny, "textvqa", tmp_path / "straight", batch_size=2, **fx)

    _, model, _ = tiny
    calls = {"n": 0}
    original = model.generate

    def dying_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", dying_generate)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tiny, "textvqa", tmp_path / "resumed", batch_size=2, **fx)
    monkeypatch.setattr(model, "generate", original)
    partial = tmp_path / "resumed" / "textvqa" / "predictions.jsonl"
    assert len(partial.read_text().splitlines()) == 2
    with open(partial, "a") as f:
        f.write('{"question_id": "img5", "te')  # a line cut by the crash

    generated = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: generated.append(1) or original(*a, **k))
    _run(tiny, "textvqa", tmp_path / "resumed", batch_size=2, **fx)
    assert len(generated) == 2  # only the 4 missing questions, in 2 batches
    for name in ("predictions.jsonl", "scores.json"):
        assert (tmp_path / "resumed" / "textvqa" / name).read_bytes() == (
            tmp_path / "straight" / "textvqa" / name
        ).read_bytes()

    # A finished run is re-scored without generating anything (and without a model).
    generated.clear()
    again = evaluate("textvqa", output=str(tmp_path / "resumed"), **fx)
    assert not generated and again["count"] == 6


def test_batch_size_1_and_16_give_identical_predictions(tiny, tmp_path):
    fx = _textvqa_fixture(tmp_path / "data", n=10)
    _run(tiny, "model_vqa", tmp_path / "b1", batch_size=1, max_new_tokens=6, **fx)
    _run(tiny, "model_vqa", tmp_path / "b16", batch_size=16, max_new_tokens=6, **fx)
    one = (tmp_path / "b1" / "model_vqa" / "predictions.jsonl").read_text()
    sixteen = (tmp_path / "b16" / "model_vqa" / "predictions.jsonl").read_text()
    assert one == sixteen and len(one.splitlines()) == 10


# ------------------------------------------------------------------------------------------ MMBench TSV
def _mmbench_tsv(path: Path) -> Path:
    import pandas as pd

    b64 = [base64.b64encode(_png(s)).decode() for s in (0, 1)]
    rows = [
        # index, question, hint, A, B, C, D, answer, category, l2-category, image
        (0, "What animal?", "A farm photo.", "dog", "cat", "cow", "", "B", "rec", "l2", b64[0]),
        (1, "Which color?", "nan", "red", "blue", "", "", "A", "attr", "l2", b64[1]),
        (1000000, "What animal?", "A farm photo.", "cat", "cow", "dog", "", "A", "rec", "l2", "0"),
        (1000001, "Which color?", "nan", "blue", "red", "", "", "B", "attr", "l2", "1"),
    ]
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    frame = pd.DataFrame(rows, columns=cols)
    frame["source"], frame["comment"] = "src", "nan"
    frame.to_csv(path, sep="\t", index=False)
    return path


def test_mmbench_tsv_circular_and_upload_file(tiny, tmp_path):
    tsv = _mmbench_tsv(tmp_path / "mmbench_dev.tsv")
    samples = get_task("mmbench").read(TaskContext(str(tsv)))
    assert samples[0].prompt == (
        "A farm photo.\nWhat animal?\nA. dog\nB. cat\nC. cow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert samples[1].prompt.startswith("Which color?\nA. red\nB. blue\n")  # "nan" hint dropped
    assert samples[2].image == samples[0].image  # short image cell = reference to row "0"
    result = _run(tiny, "mmbench", tmp_path / "out", data=str(tsv), batch_size=4)
    assert result["questions"] == 2 and result["rows"] == 4 and "category" in result
    import pandas as pd

    sheet = pd.read_excel(result["submission"], dtype=str)
    assert list(sheet.columns[:7]) == ["index", "question", "A", "B", "C", "D", "prediction"]
    assert "hint" not in sheet.columns and list(sheet["index"]) == ["0", "1", "1000000", "1000001"]
    assert sheet["question"][0] == "What animal?"

    cn = get_task("mmbench_cn").read(TaskContext(str(tsv)))
    assert cn[0].prompt.endswith("\n请直接回答选项字母。")


def test_mmbench_rotate_option_builds_rounds(tmp_path):
    tsv = _mmbench_tsv(tmp_path / "mmbench_dev.tsv")
    samples = get_task("mmbench").read(TaskContext(str(tsv), options={"rotate": "true"}))
    first = [s for s in samples if s.meta["index"] == 0]
    assert [s.key for s in first] == ["0-0", "0-1", "0-2"]
    # answer B ("cat") among [dog, cat, cow]; round 1 shows [cat, cow, dog] so "cat" is A, round 2 C.
    assert [s.target for s in first] == ["B", "A", "C"]
    assert {s.meta["group"] for s in first} == {0}


# ------------------------------------------------------------------------------------------ parquet / saved dataset
def test_parquet_docvqa_anls(tiny, tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {
            "questionId": [11, 12, 13],
            "question": ["What is the date?", "Who signed?", "What is the total?"],
            "answers": [["1 May"], ["J. Smith", "Smith"], ["$5"]],
            "image": [{"bytes": _png(i), "path": None} for i in range(3)],
        }
    )
    frame.to_parquet(tmp_path / "docvqa_val.parquet")
    samples = get_task("docvqa").read(TaskContext(str(tmp_path / "docvqa_val.parquet")))
    assert samples[0].prompt == "What is the date?\nAnswer the question using a single word or phrase."
    assert isinstance(samples[0].image, bytes) and samples[1].target == ["J. Smith", "Smith"]
    result = _run(tiny, "docvqa", tmp_path / "out", data=str(tmp_path / "docvqa_val.parquet"), batch_size=2)
    assert result["metric"] == "anls" and result["count"] == 3
    rows = json.loads(Path(result["submission"]).read_text())
    assert [r["questionId"] for r in rows] == [11, 12, 13]


def test_saved_dataset_pope_splits(tiny, tmp_path):
    import datasets

    n = 6
    ds = datasets.Dataset.from_dict(
        {
            "question_id": list(range(n)),
            "image": [_image(i) for i in range(n)],
            "question": ["Is there a dog in the image?"] * n,
            "answer": ["yes", "no"] * 3,
            "category": ["random", "random", "popular", "popular", "adversarial", "adversarial"],
        },
        features=datasets.Features(
            {
                "question_id": datasets.Value("int64"),
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "category": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "pope_ds"))
    result = _run(tiny, "pope", tmp_path / "out", data=str(tmp_path / "pope_ds"), batch_size=3)
    assert set(result["splits"]) == {"random", "popular", "adversarial"} and result["count"] == n
    only = get_task("pope_random").read(TaskContext(str(tmp_path / "pope_ds")))
    assert len(only) == 2 and only[0].prompt.endswith("\nAnswer the question using a single word or phrase.")


def test_pope_llava_file_with_label_folder_pairs_by_position(tmp_path):
    labels = tmp_path / "coco"
    labels.mkdir()
    for cat in ("random", "popular"):
        _jsonl(
            labels / f"coco_pope_{cat}.json", [{"question_id": i, "label": lab} for i, lab in enumerate(["yes", "no"])]
        )
    rows = [
        {"question_id": qid, "image": "x.jpg", "text": "Is there a cat in the image?", "category": cat}
        for qid, cat in [(10, "random"), (11, "popular"), (12, "random"), (13, "popular")]
    ]
    samples = get_task("pope").read(TaskContext(str(_jsonl(tmp_path / "q.jsonl", rows)), annotations=str(labels)))
    assert [s.target[0] for s in samples] == ["yes", "yes", "no", "no"]


# ------------------------------------------------------------------------------------------ benchmark folders
def test_mme_release_folder(tiny, tmp_path):
    root = tmp_path / "MME"
    (root / "existence").mkdir(parents=True)
    for i in range(2):
        _image(i).save(root / "existence" / f"{i}.jpg")
        (root / "existence" / f"{i}.txt").write_text(
            "Is there a dog in this image? Please answer yes or no.\tYes\n"
            "Is there a cat in this image? Please answer yes or no.\tNo\n"
        )
    (root / "code_reasoning" / "images").mkdir(parents=True)
    (root / "code_reasoning" / "questions_answers_YN").mkdir()
    _image(5).save(root / "code_reasoning" / "images" / "0020.png")
    (root / "code_reasoning" / "questions_answers_YN" / "0020.txt").write_text(
        "Is the output 3? Please answer yes or no.\tYes\nIs the output 4? Please answer yes or no.\tNo\n"
    )
    samples = get_task("mme").read(TaskContext(str(root)))
    assert samples[0].prompt == "Is the output 3?\nAnswer the question using a single word or phrase."
    assert len({s.key for s in samples}) == 6  # two questions per image share an id: keys are made unique
    result = _run(tiny, "mme", tmp_path / "out", data=str(root), batch_size=4)
    assert set(result["subtasks"]) == {"existence", "code_reasoning"}
    assert result["main"] == result["perception"] and result["count"] == 6


def test_scienceqa_llava_json_mixes_text_only_questions(tiny, tmp_path):
    (tmp_path / "images" / "1").mkdir(parents=True)
    _image(1).save(tmp_path / "images" / "1" / "image.png")
    data = [
        {"id": "1", "image": "1/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: N/A\nQuestion: Which is a cat?\nOptions: (A) dog (B) cat"},
            {"from": "gpt", "value": "B"}]},
        {"id": "2", "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which is hot?\nOptions: (A) ice (B) fire (C) snow"},
            {"from": "gpt", "value": "B"}]},
    ]  # fmt: skip
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(data))
    (tmp_path / "problems.json").write_text(
        json.dumps(
            {"1": {"answer": 1, "choices": ["dog", "cat"]}, "2": {"answer": 1, "choices": ["ice", "fire", "snow"]}}
        )
    )
    samples = get_task("scienceqa").read(
        TaskContext(str(tmp_path / "llava_test_CQM-A.json"), str(tmp_path / "images"))
    )
    assert samples[1].image is None and samples[1].target == {"answer": 1, "num_choices": 3}
    assert samples[0].prompt.endswith("(B) cat\nAnswer with the option's letter from the given choices directly.")
    result = _run(
        tiny, "scienceqa", tmp_path / "out", data=str(tmp_path / "llava_test_CQM-A.json"),
        image_folder=str(tmp_path / "images"), batch_size=2,
    )  # fmt: skip
    assert result["img_count"] == 1 and result["count"] == 2


# ------------------------------------------------------------------------------------------ scoring from answer files
def _answers(out: Path, task: str, texts: dict):
    """A finished answer file (re-scoring needs no model)."""
    _jsonl(out / task / "predictions.jsonl", [{"question_id": k, "prompt": "", "text": v} for k, v in texts.items()])


def test_submission_files_without_a_model(tmp_path):
    q = _jsonl(tmp_path / "vqav2.jsonl", [{"question_id": 7, "image": "a.jpg", "text": "How many?"}])
    full = _jsonl(tmp_path / "test2015.jsonl", [{"question_id": 7}, {"question_id": 8}])
    out = tmp_path / "out"
    (out / "vqav2").mkdir(parents=True)
    _answers(out, "vqav2", {7: "Two."})
    result = evaluate("vqav2", str(q), output=str(out), options={"test_questions": str(full)})
    assert result["main"] is None  # test split: no ground truth
    assert json.loads(Path(result["submission"]).read_text()) == [
        {"question_id": 7, "answer": "2"},
        {"question_id": 8, "answer": ""},
    ]

    viz = _jsonl(tmp_path / "vizwiz.jsonl", [{"question_id": 0, "image": "VizWiz_test_0.jpg", "text": "What?"}])
    (out / "vizwiz").mkdir()
    _answers(out, "vizwiz", {0: "Unanswerable"})
    result = evaluate("vizwiz", str(viz), output=str(out))
    assert json.loads(Path(result["submission"]).read_text()) == [
        {"image": "VizWiz_test_0.jpg", "answer": "unanswerable"}
    ]
    prompt = get_task("vizwiz").read(TaskContext(str(viz)))[0].prompt
    assert prompt == (
        "What?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    )


def test_gqa_seed_ocrbench_chartqa_qbench_scoring(tmp_path):
    out = tmp_path / "out"
    gqa = _jsonl(tmp_path / "gqa.jsonl", [{"question_id": "201", "image": "n1.jpg", "text": "Is it red?"}])
    (tmp_path / "testdev_balanced_questions.json").write_text(
        json.dumps({"201": {"answer": "yes", "imageId": "n1", "types": {"structural": "verify"}}})
    )
    (out / "gqa").mkdir(parents=True)
    _answers(out, "gqa", {"201": "Yes."})
    r = evaluate("gqa", str(gqa), annotations=str(tmp_path / "testdev_balanced_questions.json"), output=str(out))
    assert r["binary"] == 100.0 and r["open"] is None  # GQA eval.py's breakdown by structural type
    assert r["main"] == 100.0 and json.loads(Path(r["submission"]).read_text()) == [
        {"questionId": "201", "prediction": "yes"}
    ]

    seed_ann = {"questions": [
        {"question_id": "5", "data_id": "a.jpg", "question": "Q?", "choice_a": "x", "choice_b": "y", "choice_c": "z",
         "choice_d": "w", "answer": "B", "data_type": "image", "question_type_id": 1},
        {"question_id": "6", "data_id": "v/1.mp4", "question": "V?", "choice_a": "x", "choice_b": "y", "choice_c": "z",
         "choice_d": "w", "answer": "A", "data_type": "video", "question_type_id": 10}]}  # fmt: skip
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(seed_ann))
    samples = get_task("seed").read(TaskContext(str(tmp_path / "SEED-Bench.json")))
    assert len(samples) == 1 and samples[0].prompt == (
        "Q?\nA. x\nB. y\nC. z\nD. w\nAnswer with the option's letter from the given choices directly."
    )
    (out / "seed").mkdir()
    _answers(out, "seed", {"5": "B"})
    assert evaluate("seed", str(tmp_path / "SEED-Bench.json"), output=str(out))["main"] == 100.0

    ocr = [{"dataset_name": "IIIT5K", "id": 0, "image_path": "a.jpg", "question": "what is written?",
            "answers": ["STOP"], "type": "Regular Text Recognition"}]  # fmt: skip
    (tmp_path / "OCRBench.json").write_text(json.dumps(ocr))
    assert get_task("ocrbench").read(TaskContext(str(tmp_path / "OCRBench.json")))[0].prompt == "what is written?"
    (out / "ocrbench").mkdir()
    _answers(out, "ocrbench", {0: "The word is stop"})
    assert evaluate("ocrbench", str(tmp_path / "OCRBench.json"), output=str(out))["main"] == 1

    (tmp_path / "test_human.json").write_text(json.dumps([{"imgname": "c.png", "query": "Max?", "label": "50%"}]))
    (out / "chartqa").mkdir()
    _answers(out, "chartqa", {0: "0.51"})
    assert evaluate("chartqa", str(tmp_path / "test_human.json"), output=str(out))["main"] == 100.0

    qb = [
        {"img_path": "q.jpg", "question": "How is the quality?", "candidates": ["Low", "High"], "correct_ans": "High"}
    ]
    (tmp_path / "llvisionqa_dev.json").write_text(json.dumps(qb))
    sample = get_task("qbench").read(TaskContext(str(tmp_path / "llvisionqa_dev.json")))[0]
    assert sample.prompt == "How is the quality?\nChoose between one of the options as follows:\nA. Low\nB. High\n"
    (out / "qbench").mkdir()
    _answers(out, "qbench", {0: "B."})
    assert evaluate("qbench", str(tmp_path / "llvisionqa_dev.json"), output=str(out))["main"] == 100.0


def test_load_records_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"v1_0": {"question": "q"}}))
    assert load_records(tmp_path / "a.json") == [{"_key": "v1_0", "question": "q"}]
    (tmp_path / "b.tsv").write_text("index\tanswer\n1\tNone\n")
    assert load_records(tmp_path / "b.tsv") == [{"index": "1", "answer": "None"}]  # cells stay text
    with pytest.raises(ValueError):
        load_records(tmp_path / "c.txt")


# ------------------------------------------------------------------------------------------ judge
class _StubJudge(BaseHTTPRequestHandler):
    """OpenAI-compatible /v1/chat/completions: first request 500, MM-Vet garbage once, LLaVA-Bench '8 6'."""

    state = {"requests": 0, "garbled": False}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.state["requests"] += 1
        if self.state["requests"] == 1:
            self.send_response(500)
            self.send_header("retry-after-ms", "1")  # the SDK honours the server's delay: keep the test fast
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        if body["messages"][0]["role"] == "system":
            reply = "8 6\nAssistant 2 is shorter."
        elif "Predict the correctness" in text:
            reply = "0.5"
        elif "What is the sign?" in text and not self.state["garbled"]:
            self.state["garbled"] = True
            reply = "Correct!"
        else:
            reply = "1.0"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    _StubJudge.state.update(requests=0, garbled=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_mmvet_and_llava_bench_judged_with_cache(tiny, tmp_path, judge_server):
    data = tmp_path / "mm-vet"
    (data / "images").mkdir(parents=True)
    _image(0).save(data / "images" / "v1_0.png")
    _image(1).save(data / "images" / "v1_1.png")
    _jsonl(data / "llava-mm-vet.jsonl", [
        {"question_id": 0, "image": "v1_0.png", "text": "What is the sign?"},
        {"question_id": 1, "image": "v1_1.png", "text": "How many?"}])  # fmt: skip
    (data / "mm-vet.json").write_text(
        json.dumps(
            {
                "v1_0": {
                    "imagename": "v1_0.png",
                    "question": "What is the sign?",
                    "answer": "stop",
                    "capability": ["ocr"],
                },
                "v1_1": {
                    "imagename": "v1_1.png",
                    "question": "How many?",
                    "answer": "2<OR>two",
                    "capability": ["rec"],
                },
            }
        )
    )
    cache = tmp_path / "cache.jsonl"
    judge = JudgeClient(judge_server, "stub-judge", cache_path=cache, concurrency=1)
    kw = dict(data=str(data / "llava-mm-vet.jsonl"), image_folder=str(data / "images"), batch_size=2, judge=judge)
    result = _run(tiny, "mmvet", tmp_path / "out", **kw)
    # sample 0: garbage, then the digit re-ask -> 0.5; sample 1: 1.0. Requests: 500 + 2 + 1.
    assert result["main"] == 75.0 and result["capabilities"] == {"ocr": 50.0, "rec": 100.0}
    assert judge.calls == 4
    mmvet_json = json.loads((tmp_path / "out" / "mmvet" / "mmvet_results.json").read_text())
    assert set(mmvet_json) == {"v1_0", "v1_1"}

    again = JudgeClient(judge_server, "stub-judge", cache_path=cache)
    assert _run(tiny, "mmvet", tmp_path / "out", **{**kw, "judge": again})["main"] == 75.0
    assert again.calls == 0  # every judgement came from the cache

    bench = tmp_path / "llava-bench"
    (bench / "images").mkdir(parents=True)
    _image(3).save(bench / "images" / "001.jpg")
    _jsonl(bench / "questions.jsonl", [
        {"question_id": 0, "image": "001.jpg", "text": "Describe it.", "category": "detail"},
        {"question_id": 1, "image": "001.jpg", "text": "What is it?", "category": "conv"}])  # fmt: skip
    _jsonl(bench / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": ["A cat.", "On a mat."]}])
    _jsonl(
        bench / "answers_gpt4.jsonl",
        [{"question_id": 0, "text": "A cat on a mat."}, {"question_id": 1, "text": "A cat."}],
    )
    result = _run(
        tiny, "llava_bench", tmp_path / "out", data=str(bench / "questions.jsonl"),
        image_folder=str(bench / "images"), batch_size=2, judge=judge,
    )  # fmt: skip
    assert result["main"] == 75.0 and result["categories"] == {"all": 75.0, "conv": 75.0, "detail": 75.0}


def test_judge_content_and_errors(tmp_path, judge_server, monkeypatch):
    from internvl_chat.eval.judge import llava_bench_content, mmvet_query

    q = mmvet_query("How many?", "2<OR>two", "two")
    assert q.endswith("\nHow many? | 2 <OR> two | two | ") and "Just complete the last space" in q
    content = llava_bench_content(["A cat.", "On a mat."], "Q?", "ref", "ours", "conv")
    assert content.startswith(
        "[Context]\nA cat.\nOn a mat.\n\n[Question]\nQ?\n\n[Assistant 1]\nref\n\n[End of Assistant 1]"
    )
    with pytest.raises(ValueError, match="llava_bench_unknown"):
        llava_bench_content("c", "q", "r", "a", "unknown")

    monkeypatch.setenv("INTERNVL_JUDGE_BASE_URL", judge_server)
    monkeypatch.setenv("INTERNVL_JUDGE_MODEL", "m")
    client = JudgeClient.from_env()
    assert client.model == "m" and client.chat([{"role": "user", "content": "hi"}]) == "1.0"
    dead = JudgeClient("http://127.0.0.1:9/v1", "m", max_retries=1)
    with pytest.raises(JudgeError):
        dead.chat([{"role": "user", "content": "hi"}])
    monkeypatch.delenv("INTERNVL_JUDGE_BASE_URL")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert JudgeClient.from_env() is None


# ------------------------------------------------------------------------------------------ CLI
def test_cli_list_and_run(tiny, tmp_path, capsys):
    assert main(["--list-tasks"]) == 0
    listing = capsys.readouterr().out
    for name in ("vqav2", "mmbench_cn", "pope_adversarial", "llava_bench", "sroie", "llavar2_vqa", "model_vqa"):
        assert name in listing
    fx = _textvqa_fixture(tmp_path / "data", n=2)
    folder = tiny[0]
    argv = ["--model", str(folder), "--task", "model_vqa", "--data", fx["data"], "--image-folder", fx["image_folder"],
            "--output", str(tmp_path / "out"), "--batch-size", "2", "--limit", "1", "--max-new-tokens", "2",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "model_vqa" and printed["count"] == 1
    assert len((tmp_path / "out" / "model_vqa" / "predictions.jsonl").read_text().splitlines()) == 1

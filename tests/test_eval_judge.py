"""Judged evaluation (MM-Vet, LLaVA-Bench) against a scripted OpenAI-compatible judge on 127.0.0.1, re-scoring
finished answer files (no model): the official graders' numbers, files, fallbacks, default judges, resume; plus the
FUNSD / SROIE key-value convention and the report's breakdowns."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from internvl_chat import cli
from internvl_chat.eval.judge import JudgeClient, JudgeItemError
from internvl_chat.eval.report import task_details
from internvl_chat.eval.run import evaluate, main


class _Scripted(BaseHTTPRequestHandler):
    """/v1/chat/completions answering ``script(body) -> (status, text)``; every request body is logged."""

    script = None
    log: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).log.append(body)
        status, text = type(self).script(body)
        if status != 200:
            payload = json.dumps({"error": {"message": text}}).encode()
            self.send_response(status)
            self.send_header("retry-after-ms", "1")  # the SDK honours the server's delay: keeps retries fast
        else:
            message = {"role": "assistant", "content": text}
            payload = json.dumps({"model": body["model"], "choices": [{"index": 0, "message": message}]}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge(monkeypatch):
    """Starts the scripted judge and points the environment at it (no judge model set: the graders' defaults)."""
    _Scripted.log = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("INTERNVL_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.delenv("INTERNVL_JUDGE_MODEL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    yield _Scripted
    server.shutdown()


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answer_file(out: Path, task: str, answers: dict) -> list[dict]:
    """A finished predictions.jsonl with LLaVA's answer-file fields (as the runner writes them)."""
    rows = [
        {"question_id": qid, "prompt": "", "text": text, "answer_id": f"ans{qid}", "model_id": "m", "metadata": {}}
        for qid, text in answers.items()
    ]
    _jsonl(out / task / "predictions.jsonl", rows)
    return rows


# ------------------------------------------------------------------------------------------ LLaVA-Bench
def _llava_bench(root: Path) -> Path:
    cats = ["conv", "conv", "conv", "detail", "detail", "complex"]
    _jsonl(
        root / "questions.jsonl",
        [{"question_id": i, "image": "001.jpg", "text": f"Question {i}?", "category": c} for i, c in enumerate(cats)],
    )
    _jsonl(root / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": ["A cat.", "On a mat."]}])
    _jsonl(root / "answers_gpt4.jsonl", [{"question_id": i, "text": f"Reference {i}."} for i in range(6)])
    return root / "questions.jsonl"


# Judge reviews per question: conv hits the rounding case, detail one review without scores, complex a comma.
LLAVA_REVIEWS = {0: "5 4", 1: "5 7", 2: "6 10", 3: "8 6", 4: "Assistant 1: 8", 5: "7,9"}


def _llava_review(body):
    user = body["messages"][1]["content"]
    qid = int(user.split("[Question]\nQuestion ")[1].split("?")[0])
    return 200, LLAVA_REVIEWS[qid] + "\nAssistant 2 is shorter."


def test_llava_bench_as_the_official_summary(judge, tmp_path):
    judge.script = staticmethod(_llava_review)
    data = _llava_bench(tmp_path / "bench")
    out = tmp_path / "out"
    answers = _answer_file(out, "llava_bench", {i: f"Answer {i}." for i in range(6)})
    result = evaluate("llava_bench", str(data), output=str(out))

    # summarize_gpt_review.py on these reviews: means rounded to 3 decimals, then divided.
    assert result["categories"] == {"all": 116.7, "complex": 128.6, "conv": 131.3, "detail": 71.4}
    assert result["absolute"] == {
        "all": {"reference": 50.0, "model": 58.3},
        "complex": {"reference": 70.0, "model": 90.0},
        "conv": {"reference": 53.3, "model": 70.0},
        "detail": {"reference": 35.0, "model": 25.0},
    }
    assert result["main"] == 116.7 and result["judge_unparsed"] == 1
    # LLaVA's judge by default, temperature 0.2, system prompt first; recorded in the scores.
    assert {b["model"] for b in judge.log} == {"gpt-4-0314"} and {b["temperature"] for b in judge.log} == {0.2}
    assert result["judge_model"] == "gpt-4-0314"
    assert judge.log[0]["messages"][0]["content"].startswith("You are a helpful and precise assistant")

    # The review file as eval_gpt_review_bench.py writes it, joined to our answer file by answer_id.
    reviews = [json.loads(x) for x in Path(result["reviews"]).read_text().splitlines()]
    assert Path(result["reviews"]).name == "reviews_gpt-4-0314.jsonl"
    assert [r["id"] for r in reviews] == [1, 2, 3, 4, 5, 6]
    assert set(reviews[0]) == {"id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple"}
    assert [r["answer2_id"] for r in reviews] == [a["answer_id"] for a in answers]
    assert reviews[0]["answer1_id"] == 0 and reviews[0]["category"] == "llava_bench_conv"
    assert reviews[4]["tuple"] == [-1.0, -1.0] and reviews[5]["tuple"] == [7.0, 9.0]

    report = (out / "report.md").read_text()
    assert "| conv | 131.3 | 53.3 | 70.0 |" in report and "counted [-1, -1]): 1" in report

    # Re-scoring is free: every review comes from the cache.
    judge.log.clear()
    again = evaluate("llava_bench", str(data), output=str(out))
    assert again["categories"] == result["categories"] and judge.log == []


# ------------------------------------------------------------------------------------------ MM-Vet
MMVET = {
    "v1_0": ("What is the sign?", "stop", ["ocr"]),
    "v1_1": ("How many?", "2<OR>two", ["rec", "math"]),
    "v1_2": ("Which brand?", "acme", ["ocr", "rec"]),
    "v1_3": ("What colour?", "red", ["rec"]),
}


def _mmvet(root: Path) -> Path:
    meta = {
        k: {"imagename": f"{k}.png", "question": q, "answer": a, "capability": c} for k, (q, a, c) in MMVET.items()
    }
    (root / "mm-vet.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "mm-vet.json").write_text(json.dumps(meta))
    rows = [{"question_id": int(k[3:]), "image": f"{k}.png", "text": q} for k, (q, _, _) in MMVET.items()]
    return _jsonl(root / "llava-mm-vet.jsonl", rows)


def _mmvet_grader(state):
    def script(body):
        text = body["messages"][0]["content"]
        if "\nWhat colour? |" in text:
            state["colour"] += 1
            return (429, "slow down") if state["colour"] == 1 else (200, "0.3")  # a 429 is retried by the SDK
        if "\nWhat is the sign? |" in text:
            return 200, "Correct!"  # never a number: 0.0 after five re-asks
        if "\nHow many? |" in text:
            return (200, "0.9") if "Predict the correctness" in text else (200, "N/A")
        return 200, "0.4 fair"

    return script


def test_mmvet_as_the_official_evaluator(judge, tmp_path):
    state = {"colour": 0}
    judge.script = staticmethod(_mmvet_grader(state))
    data = _mmvet(tmp_path / "mm-vet")
    out = tmp_path / "out"
    _answer_file(out, "mmvet", {int(k[3:]): "an answer" for k in MMVET})
    result = evaluate("mmvet", str(data), output=str(out))

    # scores 0.0, 0.9, 0.4, 0.3: total 1.6 / 4 = 40.0; rec (0.9 + 0.4 + 0.3) / 3 = 53.33 -> 53.3 (1 decimal).
    assert result["main"] == 40.0 and result["total"] == 40.0
    assert result["capabilities"] == {"rec": 53.3, "ocr": 20.0, "math": 90.0}
    assert list(result["capability_integration"]) == ["ocr", "rec_math", "ocr_rec", "rec"]
    assert result["capability_integration"]["rec_math"] == 90.0
    assert result["judge_fallbacks"] == 1 and result["judge_fallback_items"] == ["v1_0"]
    assert result["judge_reasked"] == 2
    assert result["judge_model"] == "gpt-4-0613" and {b["model"] for b in judge.log} == {"gpt-4-0613"}

    # The fallback item: first answer at temperature 0, five digit re-asks at 0.0, 0.5 ... 2.0, then 0.0.
    sign = [b for b in judge.log if "What is the sign?" in b["messages"][0]["content"]]
    assert [b["temperature"] for b in sign] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert {b["max_tokens"] for b in judge.log} == {3} and state["colour"] == 2

    # The evaluator's grade file and tables, named as it names them for mmvet_results.json.
    grades = json.loads(Path(result["files"]["grades"]).read_text())
    assert Path(result["files"]["grades"]).name == "mmvet_results_gpt-4-0613-grade-1runs.json"
    assert grades["v1_0"] == {"model": ["gpt-4-0613"], "content": ["Correct!"], "score": [0.0]}
    assert grades["v1_2"]["content"] == ["0.4"]  # the parsed token, as the evaluator keeps it
    caps = pd.read_csv(result["files"]["capabilities"], index_col=0)
    assert list(caps.columns) == ["rec", "ocr", "math", "total", "std", "runs"]
    assert caps.loc["mmvet_results", "total"] == 40.0
    report = (out / "report.md").read_text()
    assert "without a readable score: 1 (v1_0)" in report
    # the tables keep the evaluator's column order (most questions first; combinations by count)
    assert "| rec | 53.3 |\n| ocr | 20.0 |\n| math | 90.0 |" in report
    assert "| ocr | 0.0 |\n| rec_math | 90.0 |\n| ocr_rec | 40.0 |\n| rec | 30.0 |" in report


def test_failing_judge_is_one_line_and_a_rerun_resumes(judge, tmp_path, capsys):
    data = _mmvet(tmp_path / "mm-vet")
    out = tmp_path / "out"
    _answer_file(out, "mmvet", {int(k[3:]): "an answer" for k in MMVET})

    def broken(body):
        return (500, "overloaded") if "Which brand?" in body["messages"][0]["content"] else (200, "1.0")

    judge.script = staticmethod(broken)
    argv = ["eval", "--task", "mmvet", "--data", str(data), "--output", str(out)]
    assert cli.main(argv) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("error: mmvet: the judge failed on item v1_2")
    assert "cached" in message and "rerun" in message
    assert sum("Which brand?" in b["messages"][0]["content"] for b in judge.log) == 7  # 1 + 6 SDK retries

    judge.log.clear()
    judge.script = staticmethod(lambda body: (200, "1.0"))
    assert cli.main(argv) == 0
    # Only the failed item is judged again; the others come from the cache.
    assert len(judge.log) == 1 and "Which brand?" in judge.log[0]["messages"][0]["content"]
    assert json.loads((out / "mmvet" / "scores.json").read_text())["main"] == 100.0


def test_judge_client_refusal_and_item_error(judge, tmp_path):
    judge.script = staticmethod(lambda body: (400, "bad request"))
    client = JudgeClient.from_env(cache_path=tmp_path / "c.jsonl")
    with pytest.raises(Exception, match="refused the request"):
        client.chat([{"role": "user", "content": "hi"}])
    assert client.calls == 1  # a 400 is not retried
    data = _llava_bench(tmp_path / "bench")
    out = tmp_path / "out"
    _answer_file(out, "llava_bench", {i: "a" for i in range(6)})
    with pytest.raises(JudgeItemError, match="question_id 0"):
        evaluate("llava_bench", str(data), output=str(out), judge=JudgeClient.from_env(concurrency=1))


# ------------------------------------------------------------------------------------------ FUNSD / SROIE
def test_funsd_key_value_convention_is_selectable(tmp_path):
    rows = [
        {
            "question_id": 0,
            "image": "doc1.png",
            "text": 'What is the content in the "DATE:" field?',
            "answers": ["1/2/99"],
        },
        {
            "question_id": 1,
            "image": "doc1.png",
            "text": 'What is the content in the "TO:" field?',
            "answers": ["Bob Lee"],
        },
        {
            "question_id": 2,
            "image": "doc2.png",
            "text": 'What is the content in the "FROM:" field?',
            "answers": ["Ann"],
        },
    ]
    data = _jsonl(tmp_path / "funsd.jsonl", rows)
    out = tmp_path / "out"
    _answer_file(out, "funsd", {0: "The date is 1/2/99", 1: "bob lee", 2: "Annie"})
    default = evaluate("funsd", str(data), output=str(out))
    assert default["main"] == 100.0 and default["metric"].startswith("accuracy (answer contained")
    # evalFscore: TP date, to, from (each truth inside its prediction); FP date and from (predictions longer than
    # the truth) -> precision 3/5, recall 1, F1 0.75.
    fscore = evaluate("funsd", str(data), output=str(out), options={"metric": "fscore"})
    assert fscore["main"] == pytest.approx(75.0) and "LayTextLLM evalFscore" in fscore["metric"]
    assert fscore["fscore"]["tp"] == 3 and fscore["fscore"]["fp"] == 2 and fscore["contains"] == 100.0
    report = (out / "report.md").read_text()
    assert "key-value micro-F1: 75.0" in report and "MultimodalOCR / OCRBench convention" in report
    with pytest.raises(ValueError, match="metric=contains or metric=fscore"):
        evaluate("funsd", str(data), output=str(out), options={"metric": "anls"})


def test_report_details_of_mme_and_gqa():
    mme = {"main": 50.0, "other_answers": 3, "subtasks": {"count": {"other_answers": 2}, "OCR": {"other_answers": 1}}}
    assert "- answers neither yes nor no: 3 (OCR 1, count 2)" in task_details("mme", mme)
    gqa = task_details("gqa", {"main": 60.0, "binary": 70.0, "open": 50.0})
    assert "- binary: 70.0, open: 50.0 (GQA eval.py)" in gqa
    assert task_details("textvqa", {"main": 50.0}) == []


def test_trust_remote_code_reaches_the_loader(tmp_path, monkeypatch):
    from internvl_chat.eval import runner

    seen = {}

    def fake_load(model_dir, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(runner, "load_model", fake_load)
    data = _jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "a.jpg", "text": "What?"}])
    argv = ["--task", "model_vqa", "--data", str(data), "--model", str(tmp_path), "--output", str(tmp_path / "o")]
    with pytest.raises(RuntimeError, match="stop here"):
        main([*argv, "--trust-remote-code"])
    assert seen["trust_remote_code"] is True
    with pytest.raises(RuntimeError, match="stop here"):
        main(argv)
    assert seen["trust_remote_code"] is False


# ------------------------------------------------------------------------------------------ MMBench judge fallback
def test_mmbench_judge_fallback_uses_vlmevalkit_prompt(judge, tmp_path):
    frame = pd.DataFrame(
        {"index": ["0", "1"], "question": ["What animal?", "这是什么动物?"], "A": ["dog", "狗"], "B": ["cat", "猫"]}
    )
    frame["answer"], frame["image"], frame["category"] = "B", "x", "rec"
    frame.to_csv(tmp_path / "mmbench.tsv", sep="\t", index=False)
    out = tmp_path / "out"
    long = "I would say it is the animal that purrs and sleeps on the sofa all day when it is not hungry"
    _answer_file(out, "mmbench", {0: long, 1: long})
    judge.script = staticmethod(lambda body: (200, "B"))
    plain = evaluate("mmbench", str(tmp_path / "mmbench.tsv"), output=str(out))
    assert plain["main"] == 0.0 and plain["unparsed"] == 2 and judge.log == []  # exact matching by default
    result = evaluate("mmbench", str(tmp_path / "mmbench.tsv"), output=str(out), options={"judge": "true"})
    assert result["main"] == 100.0 and result["unparsed"] == 0  # both read through the judge's reply
    assert result["judge_model"] == "gpt-3.5-turbo-0125" == judge.log[0]["model"] and result["judge_asked"] == 2
    english, chinese = (b["messages"][0]["content"] for b in judge.log)
    assert english.endswith(
        "Question: What animal??\nOptions: There are several options: \nA. dog\nB. cat\n\nAnswer: " + long
        + "\nYour output: "
    )  # fmt: skip
    assert chinese.startswith("你是一个帮助我匹配答案") and "问题: 这是什么动物??" in chinese

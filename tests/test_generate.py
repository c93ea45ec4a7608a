"""`internvl-chat data generate`: captions / enrich / qa against a scripted fake OpenAI-compatible endpoint on
127.0.0.1 (canned replies: malformed JSON repaired or not, a non-extractive answer, a 429 then success, a timeout
then success, a 400, duplicates), kill and resume, the dry-run estimate, the rate limiter, prompt files, OCR with the
optional extra, an end-to-end run against our own `internvl-chat serve` with a tiny random model (everything
rejected and counted), and the `qa` output training one step of the tiny stage-2 recipe and scoring as FFD duos.
"""

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import TOKENIZERS

ROOT = Path(__file__).resolve().parent.parent
REPAIR_MARK = "Your reply could not be used"


# ------------------------------------------------------------------------------------------- the fake endpoint
class FakeEndpoint:
    """A scripted OpenAI-compatible chat endpoint on a loopback port.

    ``script(request) -> (status, content, delay)`` decides each answer; ``request`` has ``text`` (all text of the
    last user message), ``repair`` (the call is a repair), ``image`` (the data URL sent, if any), ``attempt`` (how
    many times this same request was seen, from 1) and ``body``. Every request is kept in ``requests``.
    """

    def __init__(self, script):
        self.script = script
        self.requests = []
        self.seen = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = outer._describe(body)
                status, content, delay = outer.script(request)
                if delay:
                    time.sleep(delay)
                if status == 200:
                    payload = {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                        ],
                        # deterministic counts: a resumed run must sum to the uninterrupted run's tokens
                        "usage": {
                            "prompt_tokens": len(request["text"]) // 4,
                            "completion_tokens": len(content) // 4,
                            "total_tokens": len(request["text"]) // 4 + len(content) // 4,
                        },
                    }
                else:
                    payload = {"error": {"message": content, "type": "test", "code": status}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("retry-after-ms", "10")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _describe(self, body):
        last = body["messages"][-1]
        content = last["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = "\n".join(p["text"] for p in parts if p["type"] == "text")
        image = next((p["image_url"]["url"] for m in body["messages"] if not isinstance(m["content"], str)
                      for p in m["content"] if p["type"] == "image_url"), None)  # fmt: skip
        context = "\n".join(m["content"] if isinstance(m["content"], str) else "" for m in body["messages"])
        first_user = body["messages"][1]["content"]
        first_text = first_user if isinstance(first_user, str) else first_user[0]["text"]
        key = json.dumps(body["messages"], sort_keys=True)
        with self.lock:
            self.seen[key] = self.seen.get(key, 0) + 1
            request = {
                "text": text,
                "prompt": first_text,
                "repair": REPAIR_MARK in text,
                "image": image,
                "attempt": self.seen[key],
                "body": body,
                "context": context,
            }
            self.requests.append(request)
        return request

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    holder = {}

    def start(script):
        holder["ep"] = FakeEndpoint(script)
        return holder["ep"]

    yield start
    if "ep" in holder:
        holder["ep"].close()


def qa_reply(*pairs):
    return json.dumps(
        {"qa": [{"question": q, "answer": a, "explain_question": eq, "explain_answer": ea} for q, a, eq, ea in pairs]}
    )


def pair(question, answer):
    return (question, answer, "How can you tell?", f"The image shows {answer} clearly in the scene.")


CAPTIONS = {
    "ok": "A red sign reads OPEN 24 HOURS above a cafe called Blue Bottle.",
    "nonext": "A bus with the number 42 drives past a bakery named Crumbs.",
    "repaired": "A book cover shows the title Moby Dick in gold letters.",
    "broken": "A jersey with the name SMITH and the number 10.",
    "ratelimited": "A bottle labelled Spring Water 500 ml on a table.",
    "slow": "A street sign for Baker Street next to a red door.",
    "dupq": "A poster announcing Jazz Night on Friday.",
    "refused": "A clock tower showing 3 o'clock.",
}


def qa_script(request):
    """The canned behaviour of each record, found by its caption in the prompt."""
    prompt = request["prompt"]
    case = next((name for name, caption in CAPTIONS.items() if caption in prompt), None)
    if case == "ok":
        return (
            200,
            qa_reply(pair("What does the red sign say?", "OPEN 24 HOURS"), pair("What is the cafe?", "Blue Bottle")),
            0,
        )
    if case == "nonext":  # the second answer is not in the caption / OCR text
        return 200, qa_reply(pair("Which bus is it?", "42"), pair("What is the bakery?", "Green Door")), 0
    if case == "repaired":
        if request["repair"]:
            return 200, "```json\n" + qa_reply(pair("What is the title?", "Moby Dick")) + "\n```", 0
        return 200, 'Sure! {"qa": [{"question": "What is the title?", "answer": "Moby', 0
    if case == "broken":
        return 200, '{"qa": "no pairs today"}' if request["repair"] else "I cannot do that.", 0
    if case == "ratelimited":
        if request["attempt"] == 1:
            return 429, "slow down", 0
        return 200, qa_reply(pair("How much water is in the bottle?", "500 ml")), 0
    if case == "slow":
        delay = 3.0 if request["attempt"] == 1 else 0  # longer than the client's timeout the first time
        return 200, qa_reply(pair("Which street is this?", "Baker Street")), delay
    if case == "dupq":
        return (
            200,
            qa_reply(pair("What event is announced?", "Jazz Night"), pair("What event is announced?", "Friday")),
            0,
        )
    if case == "refused":
        return 400, "content policy", 0
    if case is None and "OCR" in prompt:  # the ocr record: its answer comes from the OCR text only
        return 200, qa_reply(pair("What is printed on the menu?", "Espresso 3 EUR")), 0
    raise AssertionError(f"unexpected prompt: {prompt[:200]}")


def write_image(path, seed=0, size=(48, 40)):
    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    Image.fromarray(rgb).save(path)
    return path


def qa_records(folder):
    records = []
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        write_image(folder / f"{name}.png", seed=i)
        records.append({"id": name, "image": f"{name}.png", "caption": caption})
    write_image(folder / "ocr.png", seed=99)
    records.append(
        {"id": "ocr", "image": "ocr.png", "caption": "A cafe menu board.", "ocr": ["Menu", "Espresso 3 EUR"]}
    )
    records.append({"id": "ok", "image": "ok.png", "caption": "duplicate id"})
    records.append({"id": "nocap", "image": "ok.png"})
    return records


def run_cli(*argv):
    from internvl_chat.data.cli import main

    return main(["generate", *argv])


def common(ep, *extra):
    return ["--base-url", ep.url, "--model", "fake", "--no-progress", "--timeout", "1", "--max-retries", "2", *extra]


# ------------------------------------------------------------------------------------------------------- tests
def test_qa_against_the_scripted_endpoint(endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a loopback endpoint needs no key
    ep = endpoint(qa_script)
    (tmp_path / "in.json").write_text(json.dumps(qa_records(tmp_path)))
    out = tmp_path / "qa.json"
    assert run_cli("qa", str(tmp_path / "in.json"), "--output", str(out), *common(ep, "--num-qa", "2")) == 0
    records = {r["id"]: r for r in json.loads(out.read_text())}
    summary = json.loads((tmp_path / "qa.summary.json").read_text())

    # written: ok (2 duos), nonext (1), repaired (1), ratelimited (1), slow (1), dupq (1), ocr (1), in input order
    assert list(records) == ["ok", "nonext", "repaired", "ratelimited", "slow", "dupq", "ocr"]
    conv = records["ok"]["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt"] * 4
    assert conv[0]["value"] == "<image>\nWhat does the red sign say?" and conv[1]["value"] == "OPEN 24 HOURS"
    assert conv[2]["value"] == "How can you tell?" and "OPEN 24 HOURS" in conv[3]["value"]
    assert sum("<image>" in t["value"] for t in conv) == 1
    assert records["nonext"]["conversations"][1]["value"] == "42" and len(records["nonext"]["conversations"]) == 4
    assert records["ocr"]["ocr"] == "Menu\nEspresso 3 EUR"
    assert "Espresso 3 EUR" in records["ocr"]["conversations"][1]["value"]
    assert not any("Green Door" in t["value"] for r in records.values() for t in r["conversations"])

    assert summary["records_in"] == 11 and summary["records_out"] == 7 and summary["duos_out"] == 8
    assert summary["duplicates"] == {"duplicate_id": 1}
    assert summary["failed"] == {"api_error": 1, "invalid_output": 1, "no_caption": 1}
    assert summary["rejected"] == {"duplicate_question": 1, "non_extractive": 1}
    tokens = summary["tokens"]["qa"]
    # one call per record, +1 per repair (repaired, broken); the SDK's retries (429, timeout) are not extra records
    assert tokens["calls"] == 10 and tokens["repairs"] == 2
    assert tokens["total_tokens"] == tokens["prompt_tokens"] + tokens["completion_tokens"] > 0

    # the SDK retried the 429 and the timeout (the same request seen twice), the 400 once per attempt (no retry)
    texts = [r["prompt"] for r in ep.requests]
    assert sum(CAPTIONS["ratelimited"] in t for t in texts) == 2
    assert sum(CAPTIONS["slow"] in t for t in texts) == 2
    assert sum(CAPTIONS["refused"] in t for t in texts) == 1
    repair = next(r for r in ep.requests if r["repair"] and CAPTIONS["repaired"] in r["context"])
    assert "not a JSON object" in repair["text"]  # the parser's message went back to the model
    assert not any(r["image"] for r in ep.requests)  # qa is text-only by default
    journal = [json.loads(line) for line in (tmp_path / "qa.json.journal.jsonl").read_text().splitlines()]
    broken = next(e for e in journal if e["id"] == "broken")
    assert (
        broken["status"] == "failed"
        and broken["reason"] == "invalid_output"
        and "after one repair" in broken["detail"]
    )

    # a rerun calls only the record that failed on an endpoint error (still refused) and writes the same output
    n = len(ep.requests)
    assert run_cli("qa", str(tmp_path / "in.json"), "--output", str(out), *common(ep, "--num-qa", "2")) == 0
    assert len(ep.requests) == n + 1 and CAPTIONS["refused"] in ep.requests[-1]["prompt"]
    assert list(json.loads(out.read_text())) == list(records.values())
    assert json.loads((tmp_path / "qa.summary.json").read_text())["tokens"]["qa"]["calls"] == 10  # a 400 has no usage
    # --retry-failed: every failure again (broken: call + repair, refused, nocap without a call)
    argv = ["qa", str(tmp_path / "in.json"), "--output", str(out), "--retry-failed"]
    assert run_cli(*argv, *common(ep, "--num-qa", "2")) == 0
    assert len(ep.requests) == n + 4
    summary = json.loads((tmp_path / "qa.summary.json").read_text())
    assert summary["tokens"]["qa"]["calls"] == 12 and summary["failed"] == {
        "api_error": 1,
        "invalid_output": 1,
        "no_caption": 1,
    }


def test_chained_steps_on_a_folder(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png", seed=1)
    write_image(images / "b.png", seed=2)
    (images / "sub").mkdir()
    (images / "sub" / "copy_of_a.png").write_bytes((images / "a.png").read_bytes())  # same picture: captioned once
    urls = {
        "data:image/png;base64," + base64.b64encode((images / n).read_bytes()).decode(): n for n in ("a.png", "b.png")
    }
    names = {"a.png": "STOP", "b.png": "EXIT 9"}

    def script(request):
        assert request["body"]["model"] == "fake"
        name = urls[request["image"]]
        word = names[name]
        if "Human caption" in request["prompt"]:  # enrich: the OCR field is in the prompt
            assert "OCR text" in request["prompt"]
            return 200, json.dumps({"caption": f"A road sign that reads {word}, seen from the street."}), 0
        if "Image description" in request["prompt"]:
            return 200, qa_reply(pair("What does the sign say?", word)), 0
        return 200, json.dumps({"caption": f"A sign with the word {word}."}), 0

    ep = endpoint(script)
    args = ("--api-key-env", "MY_KEY")
    caps = tmp_path / "caps.json"
    assert run_cli("captions", str(images), "--output", str(caps), *common(ep, *args)) == 0
    records = json.loads(caps.read_text())
    assert [r["image"] for r in records] == ["a.png", "b.png"]
    assert records[0]["conversations"] == [
        {"from": "human", "value": "<image>\nDescribe this image in detail."},
        {"from": "gpt", "value": "A sign with the word STOP."},
    ]
    assert records[0]["source"] == "natural" and len(records[0]["id"]) == 16
    assert json.loads((tmp_path / "caps.summary.json").read_text())["duplicates"] == {"duplicate_image": 1}
    assert ep.requests[0]["body"]["messages"][0]["role"] == "system"

    for r, ocr in zip(records, (["STOP"], "EXIT 9")):
        r["ocr"] = ocr
    caps.write_text(json.dumps(records))
    rich = tmp_path / "rich.jsonl"
    assert run_cli("enrich", str(caps), "--output", str(rich), "--image-folder", str(images), *common(ep, *args)) == 0
    enriched = [json.loads(line) for line in rich.read_text().splitlines()]
    assert enriched[0]["human_caption"] == "A sign with the word STOP." and enriched[0]["ocr"] == "STOP"
    assert enriched[1]["caption"] == "A road sign that reads EXIT 9, seen from the street."
    assert enriched[1]["conversations"][1]["value"] == enriched[1]["caption"]

    qa = tmp_path / "qa.json"
    assert (
        run_cli(
            "qa", str(rich), "--output", str(qa), "--send-image", "--image-folder", str(images), *common(ep, *args)
        )
        == 0
    )
    out = json.loads(qa.read_text())
    assert [r["conversations"][1]["value"] for r in out] == ["STOP", "EXIT 9"]
    assert ep.requests[-1]["image"] is not None  # --send-image
    tokens = json.loads((tmp_path / "qa.summary.json").read_text())["tokens"]
    assert list(tokens) == ["captions", "enrich", "qa"] and all(t["calls"] == 2 for t in tokens.values())

    # the key travels in the Authorization header; none of these records was written twice
    assert ep.requests and all(len(r["body"]["messages"]) == 2 for r in ep.requests)


def test_kill_and_resume_equals_an_uninterrupted_run(endpoint, tmp_path):
    """A run SIGKILLed after 3 journaled records (2 in flight) resumes to the same output, summary and tokens."""
    from internvl_chat.data.sharding import EXIT_AFTER_ENV

    ok = {k: CAPTIONS[k] for k in ("ok", "nonext", "repaired", "dupq", "broken")}
    ep = endpoint(qa_script)
    folder = tmp_path / "data"
    folder.mkdir()
    records = [{"id": k, "image": "x.png", "caption": c} for k, c in ok.items()]
    records += [{"id": f"{k}-2", "image": "x.png", "caption": c} for k, c in ok.items()]
    write_image(folder / "x.png")
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "OPENAI_API_KEY": "x", "HF_HUB_OFFLINE": "1"}

    def cli(out, **extra_env):
        # the data CLI alone (as the console script runs it after parsing), without the Auto-class registration
        code = "import sys; sys.argv[0] = 'internvl-chat'; from internvl_chat.data.cli import main; sys.exit(main())"
        argv = [sys.executable, "-c", code, "generate", "qa", str(folder / "in.jsonl")]
        argv += ["--output", str(out), *common(ep, "--concurrency", "2", "--num-qa", "2")]
        return subprocess.run(argv, env={**env, **extra_env}, capture_output=True, text=True, timeout=120)

    whole = cli(tmp_path / "whole" / "qa.json")
    assert whole.returncode == 0, whole.stderr
    killed = cli(tmp_path / "resumed" / "qa.json", **{EXIT_AFTER_ENV: "3"})
    assert killed.returncode == -9, killed.stderr
    journal = (tmp_path / "resumed" / "qa.json.journal.jsonl").read_text().splitlines()
    assert len(journal) == 3 and not (tmp_path / "resumed" / "qa.json").exists()
    resumed = cli(tmp_path / "resumed" / "qa.json")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "resumed" / "qa.json").read_bytes() == (tmp_path / "whole" / "qa.json").read_bytes()
    a, b = (json.loads((tmp_path / d / "qa.summary.json").read_text()) for d in ("whole", "resumed"))
    for s in (a, b):
        s.pop("output"), s.pop("journal")
    assert a == b and a["records_out"] == 8 and a["failed"] == {"invalid_output": 2}
    ids = [
        json.loads(line)["id"] for line in (tmp_path / "resumed" / "qa.json.journal.jsonl").read_text().splitlines()
    ]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every record once: nothing lost, nothing twice


def test_dry_run_counts_calls_and_tokens_without_calling(endpoint, tmp_path, capsys):
    ep = endpoint(qa_script)
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "small.png", seed=1, size=(300, 200))  # 768-px rule: 1 tile -> 85 + 170
    write_image(images / "wide.png", seed=2, size=(2048, 1024))  # -> 1536 x 768: 3 x 2 tiles -> 85 + 1020
    out = tmp_path / "caps.json"
    assert run_cli("captions", str(images), "--output", str(out), "--dry-run", *common(ep, "--max-tokens", "500")) == 0
    text = capsys.readouterr().out
    assert "2 call(s) for 2 record(s)" in text and "output ≤ 1,000 tokens" in text
    assert "images ≈ 1,360" in text
    assert not ep.requests and not out.exists() and not (tmp_path / "caps.json.journal.jsonl").exists()

    from internvl_chat.data.generate.api import image_tokens

    assert image_tokens(300, 200, "low") == 85 and image_tokens(4096, 4096) == 85 + 170 * 4


def test_rate_limiter_budgets():
    from internvl_chat.data.generate.api import RateLimiter

    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(requests_per_minute=2, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.acquire()
    assert now[0] == pytest.approx(30.0)  # a full bucket of 2, then one request per 30 s

    now[0], slept[:] = 0.0, []
    limiter = RateLimiter(tokens_per_minute=600, clock=lambda: now[0], sleep=sleep)
    limiter.acquire(600)
    limiter.settle(600, 300)  # the call used half of its estimate: 300 tokens come back
    limiter.acquire(300)
    assert now[0] == 0.0
    limiter.acquire(100)  # empty bucket: 100 tokens at 10 tokens / s
    assert now[0] == pytest.approx(10.0)
    limiter.acquire(10_000)  # larger than a minute's budget: waits for a full bucket, not forever
    assert now[0] == pytest.approx(70.0)
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimiter(requests_per_minute=0)


def test_extractive_rule_and_reply_parsing():
    from internvl_chat.data.generate.checks import OutputError, is_extractive, parse_caption, parse_qa

    caption = 'A red sign reads "OPEN 24 HOURS" — Café Élan, est. 2024.'
    assert is_extractive("open 24 hours", [caption])
    assert is_extractive("Café Élan", [None, caption]) and is_extractive("ＯＰＥＮ", [caption])  # NFKC
    assert not is_extractive("24", ["since 2024"]) and not is_extractive("Elan", [caption])
    assert not is_extractive("...", [caption]) and not is_extractive("closed", [caption])
    assert parse_caption('Here you go:\n{"caption": " A cat. "}\nHope it helps!') == "A cat."
    assert parse_caption('```json\n{"caption": "A dog."}\n```') == "A dog."
    for bad, message in (
        ("", "empty"),
        ("[1, 2]", "not a JSON object"),
        ('{"caption": ""}', "caption: Value error, the caption is empty"),
        ('{"text": "x"}', "caption: Field required"),
    ):
        with pytest.raises(OutputError, match=re.escape(message)):
            parse_caption(bad)
    with pytest.raises(OutputError, match="qa.0.explain_answer"):
        parse_qa(json.dumps({"qa": [{"question": "q", "answer": "a", "explain_question": "w"}]}))
    with pytest.raises(OutputError, match="no QA pairs"):
        parse_qa('{"qa": []}')
    # a generated <image> would break the record's image count: repaired, never written
    with pytest.raises(OutputError, match="reserved <image>"):
        parse_caption('{"caption": "<image> A cat."}')
    with pytest.raises(OutputError, match=r"qa.0.answer: .*reserved <image>"):
        parse_qa(
            json.dumps(
                {"qa": [{"question": "q", "answer": "<image>", "explain_question": "w", "explain_answer": "e"}]}
            )
        )


def test_prompt_files_are_editable(tmp_path, endpoint):
    from internvl_chat.data.generate.prompts import SOURCES, STEPS, export_prompts, load_prompts

    for step in STEPS:
        prompts = load_prompts(step)
        assert set(SOURCES) <= set(prompts.sources) and prompts.system
    assert "{ocr}" in load_prompts("qa").sources["document"]
    folder = tmp_path / "prompts"
    assert len(export_prompts(folder)) == 12 and export_prompts(folder) == []
    (folder / "captions" / "natural.txt").write_text("Describe the {source} picture, mention every animal.")
    (folder / "captions" / "medical.txt").write_text("Describe this scan.")
    prompts = load_prompts("captions", folder)
    assert prompts.user("natural", source="natural") == "Describe the natural picture, mention every animal."
    assert "medical" in prompts.sources and prompts.sources["document"] == load_prompts("captions").sources["document"]
    (folder / "qa" / "natural.txt").write_text("Caption: {captoin}")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{captoin\}"):
        load_prompts("qa", folder)

    # the record's source picks the prompt; an unknown source is refused before any call
    ep = endpoint(lambda r: (200, json.dumps({"caption": "A scan of a knee." if "scan" in r["prompt"] else "x"}), 0))
    write_image(tmp_path / "a.png")
    records = [{"id": "a", "image": "a.png", "source": "medical"}]
    (tmp_path / "in.json").write_text(json.dumps(records))
    args = [str(tmp_path / "in.json"), "--output", str(tmp_path / "o.json"), *common(ep, "--prompts", str(folder))]
    assert run_cli("captions", *args) == 0
    assert json.loads((tmp_path / "o.json").read_text())[0]["caption"] == "A scan of a knee."
    assert "Reply with one JSON object" in ep.requests[0]["prompt"]  # the format line is always appended
    records[0]["source"] = "xray"
    (tmp_path / "in.json").write_text(json.dumps(records))
    n = len(ep.requests)
    assert run_cli("captions", *args) == 2 and len(ep.requests) == n


def test_bad_key_stops_the_run(tmp_path, endpoint, monkeypatch, capsys):
    ep = endpoint(lambda r: (401, "invalid api key", 0))
    write_image(tmp_path / "a.png")
    out = str(tmp_path / "o.json")
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    assert run_cli("captions", str(tmp_path), "--output", out, *common(ep)) == 2
    assert "AuthenticationError" in capsys.readouterr().err and len(ep.requests) == 1
    monkeypatch.delenv("OPENAI_API_KEY")
    args = [
        str(tmp_path),
        "--output",
        out,
        "--base-url",
        "https://api.example.com/v1",
        "--model",
        "m",
        "--no-progress",
    ]
    assert run_cli("captions", *args) == 2 and "$OPENAI_API_KEY" in capsys.readouterr().err

    # a dead endpoint: after 8 records in a row failed (none succeeded) nothing more is sent; a rerun retries them
    ep.script = lambda r: (500, "down", 0)
    for i in range(12):
        write_image(tmp_path / f"img{i}.png", seed=i + 1)
    args = [str(tmp_path), "--output", out, *common(ep, "--max-retries", "0", "--concurrency", "1")]
    n = len(ep.requests)
    assert run_cli("captions", *args) == 2 and "8 records in a row failed" in capsys.readouterr().err
    journal = [json.loads(line) for line in Path(out + ".journal.jsonl").read_text().splitlines()]
    assert len(journal) == 8 and {e["reason"] for e in journal} == {"api_error"} and len(ep.requests) - n <= 10
    assert "HTTP 500" in journal[0]["detail"]


def render_text(path, lines):
    image = Image.new("RGB", (520, 80 + 70 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    for i, line in enumerate(lines):
        draw.text((30, 30 + 70 * i), line, fill="black", font=font)
    image.save(path)
    return path


def test_ocr_engine_recovers_rendered_words(tmp_path, endpoint):
    pytest.importorskip("rapidocr_onnxruntime", reason="the optional OCR extra is not installed (internvl-chat[ocr])")
    from internvl_chat.data.generate.checks import normalize
    from internvl_chat.data.generate.ocr import RapidOCREngine

    render_text(tmp_path / "sign.png", ["COFFEE", "Open 7 days"])
    text = RapidOCREngine()(Image.open(tmp_path / "sign.png"))
    assert normalize(text).split() == ["coffee", "open", "7", "days"]

    # enrich: a record without an OCR field gets the engine's text in its prompt and its record
    ep = endpoint(lambda r: (200, json.dumps({"caption": "A sign: COFFEE, open 7 days."}), 0))
    (tmp_path / "in.json").write_text(json.dumps([{"id": "s", "image": "sign.png", "caption": "A shop sign."}]))
    out = tmp_path / "rich.json"
    assert (
        run_cli("enrich", str(tmp_path / "in.json"), "--output", str(out), "--ocr-engine", "rapidocr", *common(ep))
        == 0
    )
    record = json.loads(out.read_text())[0]
    assert normalize(record["ocr"]) == "coffee open 7 days" and "COFFEE" in ep.requests[0]["prompt"]


def test_qa_output_trains_one_step_and_scores_as_ffd_duos(endpoint, tmp_path):
    """The qa file is a training file of the tiny stage-2 recipe (one real step) and `select --metric ffd` scores
    every duo of it."""
    from internvl_chat.data.select import main as select_main
    from internvl_chat.factories import create
    from internvl_chat.training.train import load_recipe, run

    ep = endpoint(qa_script)
    keep = ("ok", "nonext", "repaired", "dupq")
    records = [r for r in qa_records(tmp_path) if r["id"] in keep and "caption" in r][: len(keep)]
    (tmp_path / "in.json").write_text(json.dumps(records))
    qa = tmp_path / "qa.json"
    assert run_cli("qa", str(tmp_path / "in.json"), "--output", str(qa), *common(ep, "--num-qa", "2")) == 0
    assert len(json.loads(qa.read_text())) == 4

    recipe = load_recipe(ROOT / "recipes" / "tiny" / "llava-finetune.yaml")
    recipe["model"]["tokenizer"] = str(TOKENIZERS / "vicuna-v1.5")
    recipe["model"]["pretrain_mm_mlp_adapter"] = None
    recipe["data"] = {"data_path": str(qa), "image_folder": str(tmp_path), "template": "vicuna_v1", "max_length": 2048}
    recipe["training"].update(output_dir=str(tmp_path / "run"), max_steps=1, warmup_ratio=0, disable_tqdm=True)
    summary = run(recipe)
    assert summary["global_step"] == 1

    model_dir = tmp_path / "tiny"
    create("llava-v1.5-7b", str(model_dir), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    argv = [str(qa), "--image-folder", str(tmp_path), "--model", str(model_dir), "--metric", "ffd"]
    assert select_main([*argv, "--keep", "1.0", "--max-ratio", "inf", "--output", str(tmp_path / "sel.json")]) == 0
    scored = json.loads((tmp_path / "sel.summary.json").read_text())
    assert scored["scored_duos"] == 5 and scored["kept_duos"] == 5


@pytest.mark.slow  # 10-25 s: a server start (tiny model) and six CPU generations
def test_against_our_server_everything_rejected_and_counted(tmp_path):
    """`internvl-chat serve` with a tiny random model: the replies are noise, so every record fails validation
    (after its repair) and the run still finishes, with the failures counted and the tokens reported."""
    from test_serve import ServerProcess, make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny")
    server = ServerProcess(model_dir, "--log-level", "warning", log_path=tmp_path / "server.log")
    try:
        for i in range(3):
            write_image(tmp_path / f"img{i}.png", seed=i)
        out = tmp_path / "caps.json"
        argv = ["captions", str(tmp_path), "--output", str(out), "--base-url", server.url + "/v1", "--model", "tiny"]
        assert run_cli(*argv, "--max-tokens", "16", "--no-progress", "--concurrency", "2") == 0
    finally:
        server.stop()
    assert json.loads(out.read_text()) == []
    summary = json.loads((tmp_path / "caps.summary.json").read_text())
    assert summary["records_in"] == 3 and summary["records_out"] == 0
    assert summary["failed"] == {"invalid_output": 3}
    tokens = summary["tokens"]["captions"]
    assert tokens["calls"] == 6 and tokens["repairs"] == 3 and tokens["completion_tokens"] > 0

"""Serving: the real `internvl-chat serve` on a loopback port with a tiny model, driven by the `openai` client and
raw HTTP (streaming included); bad inputs, overload and a client killed mid-stream; the engine, the loader
(LoRA adapter, bitsandbytes error) and the terminal chat in-process.

The server fixture is module-scoped (one start, ~10 s); `ServerProcess` and `make_tiny_model` are reused by
tests/test_serve_load.py.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TOKENIZERS

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tiny_model(folder: Path) -> Path:
    from internvl_chat.factories import create

    create("llava-v1.5-7b", str(folder), tokenizer=str(TOKENIZERS / "vicuna-v1.5"), tiny=True)
    return folder


def png_bytes(width=64, height=40, seed=0) -> bytes:
    buffer = io.BytesIO()
    rgb = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


class ServerProcess:
    """`python -m internvl_chat.cli serve ...` in a subprocess on a free loopback port; waits for /health."""

    def __init__(self, model_dir: Path, *args: str, log_path: Path, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "internvl_chat.cli", "serve", "--model", str(model_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen([*cmd, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-llava")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "ok.png").write_bytes(png_bytes(seed=1))
    (folder.parent / "outside.png").write_bytes(png_bytes(seed=2))
    return folder


@pytest.fixture(scope="module")
def server(tiny_dir, media_dir, tmp_path_factory):
    # Small limits so that every one of them can be hit cheaply; batch 2 / queue 3 so that a burst overloads it.
    srv = ServerProcess(
        tiny_dir,
        "--api-key", API_KEY,
        "--max-batch-size", "2",
        "--max-queue", "3",
        "--max-body-mb", "1",
        "--max-images", "2",
        "--max-image-pixels", "10000",
        "--max-tokens-limit", "3000",
        "--allowed-local-media-path", str(media_dir),
        "--log-level", "warning",
        log_path=tmp_path_factory.mktemp("logs") / "server.log",
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Answers computed in this process with plain `model.generate` (the one-at-a-time truth)."""
    from internvl_chat.loading import load_model

    model, processor = load_model(str(tiny_dir))

    def answer(text, image_bytes=None, max_new_tokens=12):
        content = ([{"type": "image"}] if image_bytes else []) + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = [Image.open(io.BytesIO(image_bytes)).convert("RGB")] if image_bytes else None
        inputs = processor(images=images, text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.post_process_image_text_to_text(out[:, inputs["input_ids"].shape[1] :])[0]

    return answer


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def user(text, *image_urls):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def post(server, body, key=API_KEY, timeout=60):
    content = body if isinstance(body, (bytes, str)) or hasattr(body, "__next__") else json.dumps(body)
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"], error
    return error


# ---------------------------------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------------------------------


def test_health_and_models(server, client):
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    one = httpx.get(server.url + "/v1/models/tiny-llava", headers={"authorization": f"Bearer {API_KEY}"})
    assert one.status_code == 200 and one.json()["object"] == "model"
    missing = httpx.get(server.url + "/v1/models/gpt-4", headers={"authorization": f"Bearer {API_KEY}"})
    assert assert_openai_error(missing, 404)["code"] == "model_not_found"


def test_api_key_required(server):
    import openai

    assert assert_openai_error(httpx.get(server.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert_openai_error(post(server, {"model": "tiny-llava", "messages": user("hi")}, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_completion_equals_direct_generate(client, reference):
    image = png_bytes()
    response = client.chat.completions.create(
        model="tiny-llava", messages=user("What is in the image?", data_url(image)), max_tokens=12, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference("What is in the image?", image)
    assert choice.finish_reason == "length"
    # 16 image tokens + the Vicuna prompt; 12 new tokens
    assert response.usage.completion_tokens == 12 and response.usage.prompt_tokens > 16
    text_only = client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0
    )
    assert text_only.choices[0].message.content == reference("Hello")


def test_streaming_with_openai_client(client):
    kwargs = dict(
        model="tiny-llava", messages=user("Describe it.", data_url(png_bytes())), max_tokens=20, temperature=0
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 5, deltas  # token by token, not one blob
    assert "".join(deltas) == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_streaming_raw_sse(server):
    body = {"model": "tiny-llava", "messages": user("Hi"), "max_tokens": 8, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1


def test_stop_sequence(client):
    kwargs = dict(model="tiny-llava", messages=user("Tell me more"), max_tokens=30, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)].strip()
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.message.content


def test_sampling_parameters_accepted(client):
    response = client.chat.completions.create(
        model="tiny-llava",
        messages=[{"role": "system", "content": "Be brief."}, *user("Hi")],
        max_tokens=5,
        temperature=0.7,
        top_p=0.9,
        n=1,
        extra_body={"image_aspect_ratio": "resize"},
    )
    assert response.usage.completion_tokens <= 5


def test_local_paths_only_under_the_allowed_folder(server, client, media_dir):
    ok = client.chat.completions.create(
        model="tiny-llava", messages=user("What?", str(media_dir / "ok.png")), max_tokens=4, temperature=0
    )
    assert ok.choices[0].message.content is not None
    as_file_url = user("What?", "file://" + str(media_dir / "ok.png"))
    assert post(server, {"model": "tiny-llava", "messages": as_file_url, "max_tokens": 2}).status_code == 200
    for url in (
        str(media_dir.parent / "outside.png"),
        str(media_dir / ".." / "outside.png"),
        "/etc/passwd",
        "http://127.0.0.1:1/x.png",  # remote URLs are off by default
    ):
        error = assert_openai_error(post(server, {"model": "tiny-llava", "messages": user("x", url)}), 400)
        assert error["code"] == "image_url_not_allowed", (url, error)


# ---------------------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny-llava", "messages": [', 400),
    "not an object": (b"[1, 2]", 400),
    "not UTF-8": (b"\xff\xfe\x00", 400),
    "no messages": ({"model": "tiny-llava"}, 400),
    "empty messages": ({"model": "tiny-llava", "messages": []}, 400),
    "unknown model": ({"model": "gpt-4o", "messages": user("hi")}, 404),
    "invalid base64": ({"model": "tiny-llava", "messages": user("x", "data:image/png;base64,@@@not-base64@@@")}, 400),
    "not an image": ({"model": "tiny-llava", "messages": user("x", data_url(b"\x00" * 100, "image/png"))}, 400),
    "text data URL": ({"model": "tiny-llava", "messages": user("x", data_url(b"hello", "text/plain"))}, 400),
    "truncated PNG": ({"model": "tiny-llava", "messages": user("x", data_url(png_bytes()[:60]))}, 400),
    "too many pixels": ({"model": "tiny-llava", "messages": user("x", data_url(png_bytes(200, 100)))}, 400),
    "too many images": ({"model": "tiny-llava", "messages": user("x", *[data_url(png_bytes())] * 3)}, 400),
    "<image> without image": ({"model": "tiny-llava", "messages": user("<image> what is this?")}, 400),
    "more <image> than images": (
        {"model": "tiny-llava", "messages": user("<image> <image>", data_url(png_bytes()))},
        400,
    ),
    "unsupported part": ({"model": "tiny-llava", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400),
    "unsupported role": ({"model": "tiny-llava", "messages": [{"role": "tool", "content": "x"}]}, 400),
    "max_tokens over limit": ({"model": "tiny-llava", "messages": user("x"), "max_tokens": 100000}, 400),
    "max_tokens zero": ({"model": "tiny-llava", "messages": user("x"), "max_tokens": 0}, 400),
    "context too long": ({"model": "tiny-llava", "messages": user("word " * 3000), "max_tokens": 2000}, 400),
    "n=2": ({"model": "tiny-llava", "messages": user("x"), "n": 2}, 400),
    "temperature 5": ({"model": "tiny-llava", "messages": user("x"), "temperature": 5}, 400),
    "wrong types": ({"model": "tiny-llava", "messages": "hello"}, 400),
    "too many stops": ({"model": "tiny-llava", "messages": user("x"), "stop": list("abcde")}, 400),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(server, name):
    body, status = BAD_REQUESTS[name]
    assert_openai_error(post(server, body), status)


def test_oversized_bodies_and_wrong_routes(server):
    big = json.dumps({"model": "tiny-llava", "messages": user("x" * (2 * 1024 * 1024))})
    assert assert_openai_error(post(server, big), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is counted while reading
        for _ in range(3):
            yield b" " * (512 * 1024)

    assert_openai_error(post(server, chunked()), 413)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert_openai_error(httpx.get(server.url + "/v2/nothing"), 404)


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("x"))
    with pytest.raises(openai.BadRequestError, match="placeholder"):
        client.chat.completions.create(model="tiny-llava", messages=user("<image>"))


KILLED_CLIENT = textwrap.dedent(
    """
    import sys, httpx
    url, key = sys.argv[1], sys.argv[2]
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 2900,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=body, headers={"authorization": "Bearer " + key}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                print("STREAMING", flush=True)
    """
)


def test_client_killed_mid_stream_frees_its_slot(server, client):
    before = server.health()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, server.url + "/v1/chat/completions", API_KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "STREAMING"
        assert server.health()["running"] == 1
    finally:
        proc.kill()  # SIGKILL: no goodbye, the socket just closes
        proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        health = server.health()
        if health["running"] == 0 and health["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the killed client's request kept running: {server.health()}")
    # 2900 tokens were asked for; the row stopped long before (it never completed).
    assert health["completed"] == before["completed"]
    answer = client.chat.completions.create(model="tiny-llava", messages=user("Still there?"), max_tokens=4)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert server.proc.poll() is None


def test_non_streaming_client_disconnect_frees_its_slot(server):
    before = server.health()
    body = {"model": "tiny-llava", "messages": user("Go on"), "max_tokens": 2900, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        post(server, body, timeout=httpx.Timeout(60, read=1.0))  # gives up (closes) after 1 s
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        health = server.health()
        if health["running"] == 0 and health["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the abandoned request kept running: {server.health()}")


def test_over_capacity_answers_503_quickly(server):
    body = {"model": "tiny-llava", "messages": user("Go on"), "max_tokens": 100, "temperature": 0}
    results = []

    def one():
        started = time.monotonic()
        response = post(server, body)
        results.append((response, time.monotonic() - started))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(r.status_code for r, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    for response, elapsed in results:
        if response.status_code == 503:
            assert response.headers.get("retry-after") == "1"
            assert response.json()["error"]["code"] == "server_overloaded"
            assert elapsed < 5.0, elapsed  # refused at once, not after waiting
    assert server.health()["status"] == "ok"


def test_server_survived_everything(server, client):
    assert server.proc.poll() is None
    health = server.health()
    assert health["status"] == "ok" and health["failed"] == 0, health
    response = client.chat.completions.create(model="tiny-llava", messages=user("Last one"), max_tokens=3)
    assert response.choices[0].message.content is not None


def test_web_remote_backend_against_the_server(server, client):
    from internvl_chat.serve.web import RemoteBackend

    backend = RemoteBackend(server.url + "/v1", api_key=API_KEY)
    assert backend.name == "tiny-llava"
    image = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    turns = [{"role": "user", "text": "What is in the image?", "image": image}]
    streamed = "".join(backend.stream(turns, "pad", 0.0, 1.0, 10))
    direct = client.chat.completions.create(
        model="tiny-llava", messages=user("What is in the image?", data_url(png_bytes())), max_tokens=10, temperature=0
    )
    assert streamed == direct.choices[0].message.content


# ---------------------------------------------------------------------------------------------------------------------
# In-process: engine, loader, terminal chat
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from internvl_chat.loading import load_model

    return load_model(str(tiny_dir))


def test_engine_batches_equal_one_by_one(loaded):
    from internvl_chat.serve.engine import Engine, SamplingParams

    model, processor = loaded
    image = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    requests = [
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q" * (i + 1)}]}], [image])
        if i % 2
        else ([{"role": "user", "content": "text only " * i}], [])
        for i in range(6)
    ]
    params = [SamplingParams(max_new_tokens=4 + 3 * i) for i in range(6)]
    serial = Engine(model, processor, max_batch_size=1).start()
    batched = Engine(model, processor, max_batch_size=8, batch_window=0.5).start()
    try:
        one_by_one = [serial.submit(serial.prepare(m, im), p).text() for (m, im), p in zip(requests, params)]
        # Prepared first, then submitted together: the batch window (0.5 s) must not depend on how fast a loaded
        # machine preprocesses images.
        prepared = [batched.prepare(m, im) for m, im in requests]
        handles = [batched.submit(item, p) for item, p in zip(prepared, params)]
        together = [h.text() for h in handles]
        assert batched.status()["max_batch_seen"] == 6
    finally:
        serial.stop()
        batched.stop()
    assert [r.text for r in together] == [r.text for r in one_by_one]
    assert [r.completion_tokens for r in together] == [4 + 3 * i for i in range(6)]


def test_engine_timeout_and_queue_limit(loaded):
    from internvl_chat.serve.engine import Engine, Overloaded, RequestTimeout, SamplingParams

    model, processor = loaded
    engine = Engine(model, processor, max_batch_size=1, max_queue=1, request_timeout=0.3).start()
    try:
        prepared = engine.prepare([{"role": "user", "content": "Go on"}])
        running = engine.submit(prepared, SamplingParams(max_new_tokens=3000))
        time.sleep(0.1)  # let the worker take it, so the next one waits in the queue
        queued = engine.submit(prepared, SamplingParams(max_new_tokens=3000))  # starts at ~0.3 s, ends at 0.4 s
        with pytest.raises(Overloaded):
            engine.submit(prepared, SamplingParams(max_new_tokens=4))
        with pytest.raises(RequestTimeout):
            running.text()
        with pytest.raises(RequestTimeout):
            queued.text()
        assert engine.status()["timed_out"] >= 1
        engine.request_timeout = 30
        assert engine.submit(prepared, SamplingParams(max_new_tokens=2)).text().completion_tokens == 2
    finally:
        engine.stop()


def test_row_decoder_holds_back_stop_prefixes(loaded):
    from internvl_chat.serve.engine import Delta, Finished, Prepared, RequestHandle, SamplingParams, _RowDecoder

    _, processor = loaded
    tokenizer = processor.tokenizer
    handle = RequestHandle(Prepared([1, 2], None, 0), SamplingParams(max_new_tokens=50, stop=("world",)), 1e18)
    decoder = _RowDecoder(handle, tokenizer, {tokenizer.eos_token_id}, ["</s>", "world"])
    reason = None
    for token in tokenizer("Hello brave new world again", add_special_tokens=False)["input_ids"]:
        reason = decoder.add(token)
        if reason:
            break
    assert reason == "stop"
    events = []
    while not handle._events.empty():
        events.append(handle._events.get())
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "Hello brave new"
    assert isinstance(events[-1], Finished) and events[-1].text == "Hello brave new"


def test_load_model_errors(tiny_dir, tmp_path):
    import importlib.util

    from internvl_chat.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(str(tmp_path / "missing"))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ModelLoadError, match="bitsandbytes"):
            load_model(str(tiny_dir), load_4bit=True)
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_model(str(tiny_dir), model_base=str(tiny_dir))


def test_lora_adapter_with_model_base(tiny_dir, tmp_path, loaded):
    peft = pytest.importorskip("peft")
    from internvl_chat.loading import load_model

    model, processor = loaded
    base = type(model).from_pretrained(str(tiny_dir))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(base, config)
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload().eval()

    served, served_processor = load_model(str(tmp_path / "adapter"), model_base=str(tiny_dir))
    inputs = processor(text=["USER: hi ASSISTANT:"], return_tensors="pt")
    with torch.inference_mode():
        want = merged.generate(**inputs, max_new_tokens=6, do_sample=False)
        got = served.generate(**inputs, max_new_tokens=6, do_sample=False)
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()
    assert got.tolist() != plain.tolist()  # the adapter changed the model
    assert served_processor.tokenizer.padding_side == "left"


def test_terminal_chat(tiny_dir, tmp_path, monkeypatch, capsys):
    from internvl_chat.serve import chat

    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes())
    script = "\n".join(
        [
            f"/image {image}",
            "What is in the image?",
            "And now?",
            f"/save {tmp_path / 'conv.json'}",
            "/image /no/such/file.png",
            "/reset",
            "Hello",
            f"/save {tmp_path / 'after_reset.json'}",
            "/exit",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script + "\n"))
    argv = ["--model", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "8"]
    assert chat.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("ASSISTANT: ") == 3
    assert "could not load the image" in out and "conversation cleared" in out
    saved = json.loads((tmp_path / "conv.json").read_text())
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"][0] == {"type": "image", "path": str(image)}
    assert all(m["content"][-1]["text"] for m in saved["messages"])
    assert len(json.loads((tmp_path / "after_reset.json").read_text())["messages"]) == 2

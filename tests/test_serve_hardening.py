"""Hostile inputs to `internvl-chat serve` (issue 14): memory admission, the browser threat model (Host / Origin /
Content-Type), the remote-image SSRF policy, deeply nested JSON, booleans posing as numbers and OpenAI fields the
server does not implement.

Most tests drive the real FastAPI app in-process (starlette's TestClient) with the tiny model; the memory test runs
the real server in a subprocess and reads its resident memory. Every HTTP server involved listens on 127.0.0.1 and
is started here; no test reaches anything else.
"""

import asyncio
import http.server
import io
import ipaddress
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from test_serve import ServerProcess, data_url, make_tiny_model, png_bytes

MODEL = "tiny-llava"


def body(text="Hi", *image_urls, **extra):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content = [*parts, {"type": "text", "text": text}] if image_urls else text
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def solid_png(width, height, color=(10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")  # a few KB, many pixels once decoded
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("hardening") / MODEL)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from internvl_chat.loading import load_model
    from internvl_chat.serve.engine import Engine

    model, processor = load_model(str(tiny_dir))
    engine = Engine(model, processor, max_batch_size=2).start()
    yield engine
    engine.stop()


def make_client(engine, **config):
    from starlette.testclient import TestClient

    from internvl_chat.serve.server import ServerConfig, create_app

    app = create_app(engine, ServerConfig(model_name=MODEL, **config))
    return TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(engine):
    return make_client(engine)


def post(client, payload, headers=None, **kwargs):
    content = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    headers = {"content-type": "application/json", **(headers or {})}
    return client.post("/v1/chat/completions", content=content, headers=headers, **kwargs)


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---------------------------------------------------------------------------------------------------------------------
# Item 8, 11, 14: request bodies
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    ],
    ids=["unclosed", "nested value", "nested objects"],
)
def test_deeply_nested_json_is_invalid_json(client, raw):
    assert error_of(post(client, raw), 400)["code"] == "invalid_json"
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", True),
        ("max_completion_tokens", True),
        ("n", True),
        ("temperature", True),
        ("top_p", True),
        ("max_tokens", 2.0),
        ("temperature", "0.5"),
        ("stream", 1),
        ("stream_options", {"include_usage": "yes"}),
        ("stop", 5),
    ],
)
def test_booleans_and_strings_are_not_numbers(client, field, value):
    error = error_of(post(client, body(**{field: value})), 400)
    assert error["param"].split(".")[0] == field, error


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("logit_bias", {"50256": -100}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", False),
        ("seed", 7),
    ],
)
def test_unsupported_openai_fields_are_refused(client, field, value):
    error = error_of(post(client, body(**{field: value})), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter", error


def test_neutral_values_of_unsupported_fields_pass(client):
    neutral = dict(
        tools=[], tool_choice="none", response_format={"type": "text"}, logprobs=False, frequency_penalty=0,
        presence_penalty=0.0, logit_bias={}, user="me", metadata={"a": "b"},
    )  # fmt: skip
    response = post(client, body(**neutral))
    assert response.status_code == 200, response.text


def test_openai_client_sees_the_refusal(engine):
    """The openai SDK, through the same app, gets a BadRequestError naming the parameter."""
    import openai

    test_client = make_client(engine)
    sdk = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x", http_client=test_client, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert info.value.param == "logprobs"


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: browsers (DNS rebinding, cross-origin, content type)
# ---------------------------------------------------------------------------------------------------------------------


def test_host_header_must_name_this_server(client):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io:8000", "localhost.evil.example", "[::1"):
        for response in (client.get("/health", headers={"host": host}), post(client, body(), {"host": host})):
            assert error_of(response, 400)["code"] == "host_not_allowed", host
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.2", "app.localhost:8000"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_and_bind_address(engine):
    from internvl_chat.serve.server import BrowserGuard

    guard = BrowserGuard(None, bind_host="10.1.2.3", allowed_hosts=("api.example.com", ".corp.example"))
    assert guard.host_allowed("10.1.2.3:8000") and guard.host_allowed("api.example.com")
    assert guard.host_allowed("gpu1.corp.example:8000") and guard.host_allowed("corp.example")
    assert not guard.host_allowed("10.1.2.4") and not guard.host_allowed("example.com")
    assert not guard.host_allowed("xcorp.example")
    anywhere = BrowserGuard(None, bind_host="0.0.0.0")
    assert anywhere.host_allowed("192.168.1.7:8000") and not anywhere.host_allowed("rebind.example")
    named = make_client(engine, allowed_hosts=("api.example.com",))
    assert named.get("/health", headers={"host": "api.example.com:8000"}).status_code == 200


def test_cross_origin_requests_are_refused(engine, client):
    before = engine.stats.submitted
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "http://localhost:8000"):
        # text/plain needs no CORS preflight in a browser, so the server itself must refuse it.
        simple = client.post(
            "/v1/chat/completions",
            content=json.dumps(body()),
            headers={"origin": origin, "content-type": "text/plain"},
        )
        assert error_of(simple, 403)["code"] == "origin_not_allowed", origin
        assert error_of(post(client, body(), {"origin": origin}), 403)["code"] == "origin_not_allowed"
        preflight = client.options(
            "/v1/chat/completions",
            headers={"origin": origin, "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    assert engine.stats.submitted == before  # nothing reached the model
    # The same origin (a page served from this host:port) and non-browser clients (no Origin) pass.
    assert post(client, body(), {"origin": "http://127.0.0.1:8000"}).status_code == 200


def test_cors_origin_flag_allows_one_origin(engine):
    allowed = "https://app.example.com"
    cors = make_client(engine, cors_origins=(allowed,))
    preflight = cors.options(
        "/v1/chat/completions",
        headers={
            "origin": allowed,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == allowed
    response = post(cors, body(), {"origin": allowed})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == allowed
    assert error_of(post(cors, body(), {"origin": "https://other.example.com"}), 403)["code"] == "origin_not_allowed"


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_posts_must_be_json(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/chat/completions", content=json.dumps(body()).encode(), headers=headers)
    assert error_of(response, 415)["code"] == "unsupported_media_type"
    ok = post(client, body(), {"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------------------------------
# Item 5: remote images (SSRF)
# ---------------------------------------------------------------------------------------------------------------------

IMAGE = png_bytes(32, 24, seed=3)


class ImageHost(http.server.ThreadingHTTPServer):
    """A loopback HTTP server: /img.png, /redirect?to=URL, /loop (redirects to itself), /drip (one byte at a time)."""

    daemon_threads = True

    def __init__(self, address="127.0.0.1"):
        self.hits: list[str] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                host.hits.append(self.path)
                if self.path == "/img.png":
                    self.send_response(200)
                    self.send_header("content-length", str(len(IMAGE)))
                    self.end_headers()
                    self.wfile.write(IMAGE)
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("location", self.path[len("/redirect?to=") :])
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif self.path == "/loop":
                    self.send_response(302)
                    self.send_header("location", "/loop")
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif self.path == "/drip":
                    self.send_response(200)
                    self.send_header("content-length", str(len(IMAGE)))
                    self.end_headers()
                    for i in range(200):  # bounded: at most ~20 s, ended early when the client goes away
                        try:
                            self.wfile.write(IMAGE[i : i + 1])
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.1)
                else:
                    self.send_error(404)

        super().__init__((address, 0), Handler)
        self.url = f"http://{address}:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def image_hosts():
    hosts = ImageHost("127.0.0.1"), ImageHost("127.0.0.2")  # all of 127/8 is loopback on Linux
    yield hosts
    for host in hosts:
        host.shutdown()
        host.server_close()


def download(url, **config):
    from internvl_chat.serve.server import APIError, ServerConfig, download_image

    try:
        return asyncio.run(download_image(url, ServerConfig(allow_remote_images=True, **config), "image"))
    except APIError as err:
        return err


ONLY_127_0_0_1 = {"address_allowed": lambda ip: ip == ipaddress.ip_address("127.0.0.1")}
LOOPBACK = {"address_allowed": lambda ip: ip.is_loopback}


def test_public_address_policy():
    from internvl_chat.serve.server import is_public_address

    refused = ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
               "::ffff:169.254.169.254", "2002:7f00:1::", "64:ff9b::a9fe:a9fe"]  # fmt: skip
    for address in refused:
        assert not is_public_address(ipaddress.ip_address(address)), address
    for address in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "2002:808:808::"):
        assert is_public_address(ipaddress.ip_address(address)), address


def test_default_policy_refuses_loopback_before_connecting(image_hosts, engine):
    host = image_hosts[0]
    before = len(host.hits)
    port = host.server_address[1]
    for url in (f"{host.url}/img.png", f"http://localhost:{port}/img.png", f"http://2130706433:{port}/img.png"):
        error = download(url)
        assert error.code == "image_url_not_allowed", (url, error)
    # Through the app as well: a 400 naming the image, and the loopback server was never contacted.
    remote = make_client(engine, allow_remote_images=True)
    response = post(remote, body("What?", f"{host.url}/img.png"))
    assert error_of(response, 400)["code"] == "image_url_not_allowed"
    assert len(host.hits) == before


def test_download_checks_every_redirect(image_hosts):
    first, second = image_hosts
    assert download(f"{first.url}/img.png", **ONLY_127_0_0_1) == IMAGE  # the policy lets this one through
    via_redirect = f"{first.url}/redirect?to={second.url}/img.png"
    assert download(via_redirect, **LOOPBACK) == IMAGE  # the redirect itself works...
    hits = len(second.hits)
    error = download(via_redirect, **ONLY_127_0_0_1)  # ...but lands on an address the policy refuses
    assert error.code == "image_url_not_allowed" and "127.0.0.2" in error.message
    assert len(second.hits) == hits
    for scheme in ("file:///etc/passwd", "ftp://127.0.0.1/x"):
        assert download(f"{first.url}/redirect?to={scheme}", **LOOPBACK).code == "invalid_image"


def test_redirects_are_capped(image_hosts):
    host = image_hosts[0]
    before = len(host.hits)
    error = download(f"{host.url}/loop", remote_image_max_redirects=3, **LOOPBACK)
    assert error.code == "too_many_redirects"
    assert len(host.hits) - before == 4  # the first request and 3 redirects, then it stopped


def test_one_deadline_per_download(image_hosts):
    # Every byte arrives well within any per-read timeout; only a total deadline ends this download.
    error = download(f"{image_hosts[0].url}/drip", remote_image_timeout=1.0, **LOOPBACK)
    assert error.code == "image_download_timeout", error


# ---------------------------------------------------------------------------------------------------------------------
# Item 2: admission control bounds the memory of image decoding
# ---------------------------------------------------------------------------------------------------------------------


def test_busy_preprocessing_answers_503_with_retry_after(engine):
    from internvl_chat.serve.server import preprocess_cost

    image = data_url(solid_png(256, 256))
    cost = preprocess_cost([(256, 256)])
    busy = make_client(engine, max_preprocess_bytes=cost)
    budget = busy.app.state.preprocess_budget
    assert post(busy, body("What?", image)).status_code == 200  # it fits when nothing else is decoding
    assert budget.used == 0 and budget.requests == 0
    assert budget.try_acquire(1)  # another request is decoding
    try:
        response = post(busy, body("What?", image))
        assert error_of(response, 503)["code"] == "server_overloaded"
        assert response.headers["retry-after"] == "1"
        assert post(busy, body("Text only")).status_code == 200  # text needs no image memory
    finally:
        budget.release(1)
    # Refusals and errors give their share back: a corrupt image, then the same request succeeds.
    assert error_of(post(busy, body("x", data_url(solid_png(256, 256)[:80]))), 400)["code"] == "invalid_image"
    assert budget.used == 0 and post(busy, body("What?", image)).status_code == 200


def test_request_that_can_never_fit_is_too_large(engine):
    from internvl_chat.serve.server import preprocess_cost

    small = make_client(engine, max_preprocess_bytes=preprocess_cost([(256, 256)]))
    error = error_of(post(small, body("x", data_url(solid_png(512, 512)))), 400)
    assert error["code"] == "image_too_large" and "MiB" in error["message"]
    # The resize band of a long thin image is counted: more than a square image of as many pixels.
    assert preprocess_cost([(16384, 16)]) > preprocess_cost([(512, 512)]) * 2


def test_extreme_aspect_ratio_refused_from_the_header(engine):
    """400000x40 passes a 4096² pixel limit, but padding it needs a buffer beyond the limit (the tiny model's images
    are 56 pixels: 56 x 400000): refused before decoding (the image processor's bound, as 400 `image_too_large`)."""
    wide = make_client(engine, max_image_pixels=4096 * 4096)
    before = engine.stats.submitted
    error = error_of(post(wide, body("x", data_url(solid_png(400_000, 40)), image_aspect_ratio="pad")), 400)
    assert error["code"] == "image_too_large" and error["param"].endswith("image_url"), error
    assert engine.stats.submitted == before
    assert wide.app.state.preprocess_budget.used == 0
    assert post(wide, body("x", data_url(solid_png(4096, 64)), image_aspect_ratio="pad")).status_code == 200


def test_engine_maps_too_large_images(engine):
    from internvl_chat.serve.engine import ImageTooLarge

    image = Image.new("RGB", (2_000_000, 8), (1, 2, 3))  # 16 M pixels; its pad buffer (56 x 2 M) is over the limit
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ImageTooLarge) as info:
        engine.prepare(messages, [image])
    assert info.value.code == "image_too_large" and info.value.status == 400


def test_memory_returns_after_a_burst_of_large_images(tiny_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    images = [data_url(solid_png(2048, 2048, (30 * i, 90, 160))) for i in range(4)]
    payload = body("What?", *images)
    server = ServerProcess(
        tiny_dir, "--max-image-pixels", str(2048 * 2048), "--max-images", "8", "--log-level", "warning",
        log_path=tmp_path / "server.log",
    )  # fmt: skip
    try:
        process = psutil.Process(server.proc.pid)

        def ask():
            response = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=120)
            assert response.status_code == 200, response.text

        ask()  # warm-up: every lazily imported module and one-off cache is in the baseline
        baseline = process.memory_info().rss
        peak = baseline
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.05)
        for thread in threads:
            thread.join()
        health = server.health()
        assert health["preprocessing"] == 0 and health["preprocess_bytes"] == 0
        after = process.memory_info().rss
        mib = 2**20
        # 16 images of 16 MiB decoded (about 1 GiB at the peak); afterwards the server is back near its baseline.
        assert after - baseline < 128 * mib, (baseline / mib, peak / mib, after / mib)
    finally:
        server.stop()


def test_cost_estimate_covers_what_decoding_holds():
    """The estimate is an upper bound of the decoded images' own memory (PIL: 4 bytes a pixel for RGB)."""
    from internvl_chat.serve.server import preprocess_cost

    image = Image.open(io.BytesIO(solid_png(300, 200))).convert("RGB")
    assert preprocess_cost([image.size]) >= 2 * 300 * 200 * 4
    assert preprocess_cost([None, None]) == 0

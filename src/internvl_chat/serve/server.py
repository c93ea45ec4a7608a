"""`internvl-chat serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with dynamic batching.

    internvl-chat serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]
        [--max-batch-size 16] [--batch-window-ms 10] [--max-queue 64] [--request-timeout 300]
        [--allowed-host NAME] [--cors-origin URL] [--max-preprocess-mb 2048]
        [--allowed-local-media-path DIR] [--allow-remote-images] [model options: see loading.py]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model="NAME", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the image?"}]}], max_tokens=64, stream=True)

Endpoints: `POST /v1/chat/completions` (text and `image_url` parts; `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `stop`, `stream` with `stream_options.include_usage`, `n=1`; extension:
`image_aspect_ratio` = pad / square / resize), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`.
OpenAI fields that would change the answer and are not implemented (`tools`, `response_format`, `logprobs`...) are
refused (400 naming the `param`), never silently ignored.

Images: `data:` URLs always; local paths (or `file://` URLs) only inside `--allowed-local-media-path`; http(s)
URLs only with `--allow-remote-images` (public addresses only, checked at every redirect; one deadline per
download). Every bad request gets a 4xx JSON body in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`); over capacity (queue, or bytes of images being decoded) answers
503 with `Retry-After` at once; the API key, when set (`--api-key` or `INTERNVL_CHAT_API_KEY`), is required as
`Authorization: Bearer KEY` on /v1 routes. Browsers: the `Host` header must name this server (DNS rebinding),
cross-origin requests are refused unless `--cors-origin` allows them, and POST bodies must be `application/json`.
The threat model: docs/serving.md.
"""

import argparse
import asyncio
import base64
import binascii
import ctypes
import ctypes.util
import hmac
import io
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..loading import ModelLoadError, add_model_args, load_model, model_kwargs

if TYPE_CHECKING:  # the engine (torch) is imported where it is used: `serve --help` answers before torch loads
    from .engine import Engine, SamplingParams

logger = logging.getLogger(__name__)

API_KEY_ENV = "INTERNVL_CHAT_API_KEY"


@dataclass
class ServerConfig:
    """Limits and policy of the HTTP layer (the engine has its own: batch size, queue, timeout)."""

    model_name: str = "internvl-chat"
    api_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_tokens_limit: int = 2048
    default_max_tokens: int = 512
    allowed_local_media_path: str | None = None
    allow_remote_images: bool = False
    remote_image_timeout: float = 10.0  # one deadline for a whole download, redirects included
    remote_image_max_redirects: int = 3
    # Which resolved addresses a remote image may come from; replaceable in tests (which only have 127.0.0.1).
    address_allowed: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool] = field(
        default_factory=lambda: is_public_address
    )
    max_stop_sequences: int = 4
    # Bytes that image decoding + preprocessing of all requests in flight may hold (see `preprocess_cost`).
    max_preprocess_bytes: int = 2048 * 1024 * 1024
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()  # extra `Host` names ("*" = any; ".example.com" = it and its subdomains)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*" = any)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------------------
# Request schema (pydantic, strict: `true` is not an integer, "1" is not a number; unknown fields that do not change
# the answer, such as `user` or `metadata`, are accepted and ignored; those that would are refused, see below)
# ---------------------------------------------------------------------------------------------------------------------


def _schemas():
    """Built lazily so that importing this module (e.g. for `make_parser`) does not import pydantic/fastapi."""
    from pydantic import BaseModel, ConfigDict, Field

    strict = ConfigDict(extra="allow", strict=True)

    class ImageURL(BaseModel):
        model_config = strict
        url: str
        detail: str | None = None

    class ContentPart(BaseModel):
        model_config = strict
        type: str
        text: str | None = None
        image_url: ImageURL | str | None = None

    class Message(BaseModel):
        model_config = strict
        role: str
        content: str | list[ContentPart] | None = None

    class StreamOptions(BaseModel):
        model_config = strict
        include_usage: bool = False

    class ChatCompletionRequest(BaseModel):
        model_config = strict
        model: str
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = Field(default=None, ge=0.0, le=2.0)
        top_p: float | None = Field(default=None, gt=0.0, le=1.0)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        n: int | None = Field(default=None, ge=1)
        image_aspect_ratio: Literal["pad", "square", "resize"] | None = None

    return ChatCompletionRequest


# OpenAI request fields this server does not implement, each with the values that mean "not used". Any other value
# would silently change what the client asked for (a tool call, a JSON answer, log-probabilities...): refused.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "seed": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}


def refuse_unsupported_fields(payload: dict) -> None:
    for name, neutral in UNSUPPORTED_FIELDS.items():
        if name not in payload:
            continue
        value = payload[name]
        # `0 == False` in Python: compare types too, so `presence_penalty: false` is not taken for 0.
        if any(value == ok and type(value) is type(ok) for ok in neutral) or (
            value == 0 and type(value) in (int, float) and 0 in neutral
        ):
            continue
        raise APIError(
            400,
            f"`{name}` is not supported by this server (got {json.dumps(value)[:80]}); remove it.",
            param=name,
            code="unsupported_parameter",
        )


# ---------------------------------------------------------------------------------------------------------------------
# Images: where they may come from (local folder, remote SSRF policy), what decoding them costs, admission
# ---------------------------------------------------------------------------------------------------------------------


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses: loopback, private, link-local (cloud metadata), shared (CGNAT),
    reserved, unspecified and multicast are refused, and so are IPv6 forms embedding such an IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None:
            return is_public_address(ip.teredo[1])
        if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the last 32 bits are an IPv4 address
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return ip.is_global and not ip.is_multicast


def _resolve_local_path(url: str, config: ServerConfig, param: str) -> str:
    if not config.allowed_local_media_path:
        raise APIError(
            400,
            "Local image paths are disabled; send the image as a data: URL (or start the server with "
            "--allowed-local-media-path DIR).",
            param=param,
            code="image_url_not_allowed",
        )
    path = url[len("file://") :] if url.startswith("file://") else url
    root = os.path.realpath(config.allowed_local_media_path)
    # [IMPORTANT] realpath resolves `..` and symlinks BEFORE the containment check, so neither can escape the root.
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise APIError(
            400, f"Image path {path!r} is outside the allowed folder.", param=param, code="image_url_not_allowed"
        )
    return real


async def _vetted_address(url, config: ServerConfig, param: str) -> str:
    """Resolves the URL's host; every address it resolves to must pass `config.address_allowed`. Returns one."""
    host = url.host
    try:
        literal = ipaddress.ip_address(host)
        addresses = [literal]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise APIError(400, f"{param}: cannot resolve {host!r}: {err}", param=param, code="invalid_image") from err
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [a for a in addresses if not config.address_allowed(a)]
    if not addresses or refused:
        # All of them: a name resolving to one public and one private address must not get a second chance.
        raise APIError(
            400,
            f"{param}: {host!r} resolves to a non-public address ({refused[0] if refused else 'none'}); remote "
            "images may only come from public addresses.",
            param=param,
            code="image_url_not_allowed",
        )
    return str(addresses[0])


async def download_image(url: str, config: ServerConfig, param: str) -> bytes:
    """GET an http(s) image under the SSRF policy: every hop's host is resolved and vetted, then connected to by that
    vetted address (no second DNS answer can swap it); at most `remote_image_max_redirects` redirects; one total
    deadline (`remote_image_timeout`) for the whole download, so a server dripping bytes cannot hold the request;
    at most `max_body_bytes`. Raises APIError (400)."""
    try:
        async with asyncio.timeout(config.remote_image_timeout):
            return await _download(url, config, param)
    except TimeoutError:
        raise APIError(
            400,
            f"{param}: downloading the image took longer than {config.remote_image_timeout:g} s.",
            param=param,
            code="image_download_timeout",
        ) from None


async def _download(url: str, config: ServerConfig, param: str) -> bytes:
    import httpx

    limit = config.max_body_bytes
    # trust_env=False: a proxy from the environment would connect on our behalf to whatever the name resolves to.
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None) as client:
        for _ in range(config.remote_image_max_redirects + 1):
            try:
                target = httpx.URL(url)
            except (httpx.InvalidURL, TypeError) as err:
                raise APIError(400, f"{param}: invalid URL {url!r}.", param=param, code="invalid_image") from err
            if target.scheme not in ("http", "https") or not target.host:
                raise APIError(
                    400, f"{param}: only http(s) URLs can be downloaded ({url!r}).", param=param, code="invalid_image"
                )
            address = await _vetted_address(target, config, param)
            request = client.build_request(
                "GET",
                target.copy_with(host=address),
                headers={"Host": target.netloc.decode("ascii")},
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
            )
            try:
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urllib.parse.urljoin(str(target), location)
                        continue
                    response.raise_for_status()
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise APIError(400, f"{param}: the remote image is larger than {limit} bytes.", param=param)
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data.extend(chunk)
                        if len(data) > limit:
                            raise APIError(
                                400, f"{param}: the remote image is larger than {limit} bytes.", param=param
                            )
                    return bytes(data)
                finally:
                    await response.aclose()
            except httpx.HTTPError as err:
                raise APIError(
                    400, f"{param}: could not download {url!r}: {err}", param=param, code="invalid_image"
                ) from err
    raise APIError(
        400,
        f"{param}: more than {config.remote_image_max_redirects} redirects.",
        param=param,
        code="too_many_redirects",
    )


def _decode_data_url(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header[5:].lower().startswith(("image/", ";")) and header != "data:":
        raise APIError(400, f"{param}: data URL is not an image ({url[:40]!r}).", param=param, code="invalid_image")
    try:
        if header.lower().endswith(";base64"):
            return base64.b64decode("".join(payload.split()), validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"{param}: invalid base64 data: {err}", param=param, code="invalid_image") from err


async def fetch_image(url: str, config: ServerConfig, param: str) -> bytes | str:
    """One `image_url` → its encoded bytes (data: and http(s) URLs) or an allowed local path. Nothing is decoded."""
    if url.startswith("data:"):
        if len(url) < 65536:
            return _decode_data_url(url, param)
        return await asyncio.to_thread(_decode_data_url, url, param)  # megabytes of base64: off the event loop
    if url.startswith(("http://", "https://")):
        if not config.allow_remote_images:
            raise APIError(
                400,
                "Remote image URLs are disabled on this server; send the image as a data: URL "
                "(or start it with --allow-remote-images).",
                param=param,
                code="image_url_not_allowed",
            )
        return await download_image(url, config, param)
    if url.startswith("file://") or url.startswith("/") or url.startswith("."):
        return _resolve_local_path(url, config, param)
    raise APIError(
        400,
        f"{param}: unsupported image URL (expected a data: URL, an http(s) URL or an allowed local path).",
        param=param,
        code="invalid_image",
    )


def image_size(source: bytes | str) -> tuple[int, int] | None:
    """(width, height) from the header alone; None when it cannot be read (decoding then reports why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable header: `decode_images` names the error
        return None


def check_image_sizes(sizes, sources, config: ServerConfig, engine: "Engine", mode: str | None) -> None:
    """From the headers, before decoding: the pixel limit, and what the image processor would refuse to preprocess
    in this request's aspect-ratio mode (an extreme aspect ratio's buffers). Raises APIError (400)."""
    from ..data.images import ImageLoadError, ImageTooLargeError, check_image_pixels

    image_processor = getattr(engine.processor, "image_processor", None)
    overrides = {"image_aspect_ratio": mode} if mode else {}
    for size, (_, param) in zip(sizes, sources):
        if size is None:
            continue
        try:
            check_image_pixels(size[0], size[1], config.max_image_pixels, param)
            if hasattr(image_processor, "check_image_size"):
                image_processor.check_image_size(
                    size[0], size[1], name=param, max_image_pixels=config.max_image_pixels, **overrides
                )
        except ImageTooLargeError as err:
            raise APIError(400, str(err), param=param, code="image_too_large") from err
        except ImageLoadError as err:
            raise APIError(400, f"Invalid image: {err}", param=param, code="invalid_image") from err


def preprocess_cost(sizes: list[tuple[int, int] | None]) -> int:
    """Bytes decoding + preprocessing these images may hold at once: every decoded image stays alive until the
    processor ran (PIL keeps RGB as 4 bytes a pixel), and the largest one is also converted (a second copy, up to
    16 bytes a pixel for 16-bit or float sources) and padded and resized through buffers of at most its own size or
    a 448-pixel-wide band of its longer side."""
    known = [(w, h) for w, h in (s for s in sizes if s)]
    if not known:
        return 0
    held = sum(4 * w * h for w, h in known)
    peak = max(16 * w * h + 4 * max(w * h, 448 * max(w, h)) for w, h in known)
    return held + peak


def decode_images(sources: list[tuple[bytes | str, str]], config: ServerConfig) -> list:
    """Encoded images → RGB PIL images, by the server's pixel limit. Raises APIError (400)."""
    from ..data.images import ImageLoadError, ImageTooLargeError, load_image

    images = []
    for source, param in sources:
        try:
            images.append(load_image(source, max_pixels=config.max_image_pixels, name=param))
        except ImageTooLargeError as err:
            raise APIError(400, str(err), param=param, code="image_too_large") from err
        except (ImageLoadError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise APIError(400, f"Invalid image: {err}", param=param, code="invalid_image") from err
    return images


def parse_messages(request, config: ServerConfig) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages → (HF chat-template messages with {"type": "image"} blocks, [(image url, param)] in order)."""
    messages, image_urls = [], []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"Unsupported role {message.role!r} in messages[{i}].", param=f"messages[{i}].role")
        if message.content is None or isinstance(message.content, str):
            messages.append({"role": role, "content": message.content or ""})
            continue
        blocks = []
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"{param}: a text part needs `text`.", param=param)
                blocks.append({"type": "text", "text": part.text})
            elif part.type == "image_url":
                if role != "user":
                    raise APIError(400, f"{param}: images are only accepted in user messages.", param=param)
                url = part.image_url.url if hasattr(part.image_url, "url") else part.image_url
                if not url:
                    raise APIError(400, f"{param}: an image_url part needs `image_url.url`.", param=param)
                image_urls.append((url, f"{param}.image_url"))
                blocks.append({"type": "image"})
            else:
                raise APIError(
                    400, f"{param}: unsupported content part type {part.type!r} (text, image_url).", param=param
                )
        messages.append({"role": role, "content": blocks})
    if len(image_urls) > config.max_images:
        raise APIError(
            400,
            f"Too many images: {len(image_urls)} (this server accepts at most {config.max_images} per request).",
            param="messages",
            code="too_many_images",
        )
    return messages, image_urls


class PreprocessBudget:
    """Admission control for image decoding: the `preprocess_cost` of every request between decoding its images and
    handing the (small) pixel tensors to the engine. A request that does not fit right now is refused (503 +
    Retry-After) before anything is decoded; one that could never fit is refused as too large (400)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.requests = 0
        self._lock = threading.Lock()

    def try_acquire(self, cost: int) -> bool:
        with self._lock:
            if self.requests and self.used + cost > self.capacity:
                return False
            self.used += cost
            self.requests += 1
            return True

    def release(self, cost: int) -> bool:
        """Returns True when nothing is in flight any more."""
        with self._lock:
            self.used -= cost
            self.requests -= 1
            return self.requests == 0


_LIBC = None


def release_memory() -> None:
    """Hands freed heap pages back to the OS. glibc keeps freed blocks of decoded images in its per-thread arenas
    (the threshold above which it maps large blocks separately grows after each free), so without this a burst of
    large images leaves the server's resident memory at its peak."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC and _LIBC.malloc_trim  # noqa: B018 - musl / macOS have no malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def sampling_params(request, config: ServerConfig) -> "SamplingParams":
    if request.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n")
    max_tokens = request.max_completion_tokens or request.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is above this server's limit of {config.max_tokens_limit}.",
            param="max_tokens",
        )
    stop = request.stop
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > config.max_stop_sequences or any(not s for s in stop):
        raise APIError(
            400, f"stop: at most {config.max_stop_sequences} non-empty sequences are supported.", param="stop"
        )
    temperature = 1.0 if request.temperature is None else request.temperature  # OpenAI's default is 1
    top_p = 1.0 if request.top_p is None else request.top_p
    from .engine import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop))


# ---------------------------------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------------------------------


def create_app(engine: "Engine", config: ServerConfig):
    """The FastAPI app serving `engine`. The engine must be started (`engine.start()`) by the caller."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .engine import EngineError, Overloaded

    request_model = _schemas()
    # [IMPORTANT] not FastAPI(max_body_size=...): its middleware replaces our response with a plain-text 413.
    # The middleware answers a too-large Content-Length before any byte is read; `read_body` counts chunked ones.
    app = FastAPI(title="internvl-chat")
    app.add_middleware(ContentLengthLimit, max_bytes=config.max_body_bytes)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    # Outermost (added last): a refused Host / Origin gets no further, not even a CORS preflight answer.
    app.add_middleware(
        BrowserGuard, bind_host=config.bind_host, allowed_hosts=config.allowed_hosts, cors_origins=config.cors_origins
    )
    budget = PreprocessBudget(config.max_preprocess_bytes)
    app.state.preprocess_budget = budget

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > config.max_body_bytes:
                raise APIError(
                    413,
                    f"Request body too large (limit {config.max_body_bytes} bytes).",
                    code="request_too_large",
                )
        return bytes(body)

    app.state.engine, app.state.config = engine, config

    def json_error(status: int, message: str, type_="invalid_request_error", param=None, code=None, headers=None):
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return json_error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(EngineError)
    async def _engine_error(_, exc: EngineError):
        headers = {"Retry-After": "1"} if isinstance(exc, Overloaded) else None
        return json_error(exc.status, str(exc), exc.type, None, exc.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        # 404 unknown route, 405 wrong method.
        codes = {404: "not_found", 405: "method_not_allowed"}
        return json_error(exc.status_code, str(exc.detail), code=codes.get(exc.status_code), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        return json_error(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        logger.exception("unexpected error")
        return json_error(500, f"Internal server error: {type(exc).__name__}", "server_error", code="internal_error")

    async def check_api_key(request: Request):
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time comparison: the key must not leak through response timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key (send `Authorization: Bearer KEY`).",
                code="invalid_api_key",
            )

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "internvl-chat"}

    @app.get("/health")
    async def health():
        status = engine.status()
        ok = engine.alive
        status.update(preprocessing=budget.requests, preprocess_bytes=budget.used)
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "model": config.model_name, **status},
            status_code=200 if ok else 503,
        )

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_api_key)])
    async def get_model(model_id: str):
        if model_id != config.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat_completions(request: Request):
        # The body is read and validated here (not by a FastAPI body parameter) so that every malformed input
        # gets OpenAI's error shape and a 400, not FastAPI's 422 `detail` list.
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            # A browser sends text/plain or form bodies cross-origin without a CORS preflight: refuse them.
            raise APIError(
                415,
                f"Content-Type must be application/json (got {media_type or 'none'!r}).",
                code="unsupported_media_type",
            )
        raw = await read_body(request)
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"Invalid JSON body: {err}", code="invalid_json") from err
        except RecursionError:
            raise APIError(400, "Invalid JSON body: nested too deeply.", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        refuse_unsupported_fields(payload)
        try:
            body = request_model.model_validate(payload)
        except RecursionError:
            raise APIError(400, "Invalid request: nested too deeply.", code="invalid_json") from None
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"Invalid request: {param}: {first['msg']}", param=param) from err
        if body.model != config.model_name:
            raise APIError(
                404,
                f"The model {body.model!r} does not exist; this server serves {config.model_name!r}.",
                param="model",
                code="model_not_found",
            )
        params = sampling_params(body, config)
        messages, image_urls = parse_messages(body, config)
        status = engine.status()
        if status["queued"] >= engine.max_queue:
            # Answer before decoding any image: over capacity must be cheap.
            raise Overloaded(f"The server is at capacity ({engine.max_queue} requests waiting); retry shortly.")
        sources = [(await fetch_image(url, config, param), param) for url, param in image_urls]
        sizes = await run_in_threadpool(lambda: [image_size(source) for source, _ in sources])
        check_image_sizes(sizes, sources, config, engine, body.image_aspect_ratio)
        cost = preprocess_cost(sizes)
        if cost > budget.capacity:
            raise APIError(
                400,
                f"The images of this request need about {cost / 2**20:.0f} MiB to preprocess; this server allows "
                f"{budget.capacity / 2**20:.0f} MiB (send smaller images, or fewer).",
                param="messages",
                code="image_too_large",
            )
        if not budget.try_acquire(cost):
            raise Overloaded("The server is busy decoding images; retry shortly.")
        try:
            images = await run_in_threadpool(decode_images, sources, config)
            sources = None
            prepared = await run_in_threadpool(engine.prepare, messages, images, body.image_aspect_ratio)
        finally:
            images = sources = None
            if budget.release(cost) and cost:
                await run_in_threadpool(release_memory)
        handle = engine.submit(prepared, params, loop=asyncio.get_running_loop())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(handle, completion_id, created, config.model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        result_task = asyncio.ensure_future(handle.atext())
        try:
            # A client that goes away while waiting frees its slot: poll for the disconnect while generating.
            while not result_task.done():
                await asyncio.wait({result_task}, timeout=0.25)
                if not result_task.done() and await request.is_disconnected():
                    logger.info("client disconnected; cancelling %s", completion_id)
                    handle.cancel()
                    result_task.cancel()
                    return JSONResponse(error_body("Client disconnected.", code="cancelled"), status_code=499)
            result = result_task.result()
        finally:
            if not result_task.done():
                result_task.cancel()
                handle.cancel()
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
        }

    return app


class ContentLengthLimit:
    """Pure ASGI middleware: 413 JSON for a declared Content-Length above `max_bytes` (nothing is read)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        length = -1
                    if length < 0 or length > self.max_bytes:
                        from starlette.responses import JSONResponse

                        if length < 0:
                            status, message = 400, "Invalid Content-Length header."
                        else:
                            status, message = 413, f"Request body too large ({length} bytes; limit {self.max_bytes})."
                        response = JSONResponse(error_body(message, code="request_too_large"), status_code=status)
                        await response(scope, receive, send)
                        return
        await self.app(scope, receive, send)


LOCAL_HOST_NAMES = ("localhost",)


class BrowserGuard:
    """Pure ASGI middleware against web pages driving the server from a user's browser.

    * `Host` must name this server: a loopback address or `localhost` (or a subdomain of it), the bound address
      (any IP literal when bound to 0.0.0.0 / ::), or an `--allowed-host` name. A page on an attacker's domain that
      re-resolves that domain to 127.0.0.1 (DNS rebinding) sends its own domain as Host: refused (400).
    * A request with an `Origin` header (browsers send one on cross-origin fetches, preflight-free text/plain POSTs
      included) is refused (403) unless the origin is this server itself or allowed by `--cors-origin`.
    Requests without these headers (HTTP clients, the openai SDK, curl) are not browsers and pass.
    """

    def __init__(self, app, bind_host: str, allowed_hosts=(), cors_origins=()):
        self.app = app
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.cors_origins = {o.lower().rstrip("/") for o in cors_origins}
        try:
            self.bind_ip = ipaddress.ip_address(bind_host.strip("[]"))
        except ValueError:  # a name: it is allowed as a Host too
            self.bind_ip = None
            self.allowed_hosts.add(bind_host.lower())

    def host_allowed(self, host: str) -> bool:
        try:
            name = urllib.parse.urlsplit("//" + host).hostname or ""
            urllib.parse.urlsplit("//" + host).port  # noqa: B018 - raises on a malformed port
        except ValueError:
            return False
        name = name.rstrip(".")
        if "*" in self.allowed_hosts or name in LOCAL_HOST_NAMES or name.endswith(".localhost"):
            return True
        if name in self.allowed_hosts or any(
            h.startswith(".") and (name.endswith(h) or name == h[1:]) for h in self.allowed_hosts
        ):
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return ip.is_loopback or (self.bind_ip is not None and (self.bind_ip.is_unspecified or ip == self.bind_ip))

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.lower().rstrip("/")
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        parts = urllib.parse.urlsplit(origin)
        return bool(host) and parts.scheme in ("http", "https") and parts.netloc == host.lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {}
            for name, value in scope.get("headers", ()):
                headers.setdefault(name, value.decode("latin-1"))
            host, origin = headers.get(b"host"), headers.get(b"origin")
            problem = None
            if host is not None and not self.host_allowed(host):
                problem = (400, f"Host {host!r} is not allowed (see --allowed-host).", "host_not_allowed")
            elif origin is not None and not self.origin_allowed(origin, host):
                problem = (403, f"Cross-origin requests from {origin!r} are not allowed (see --cors-origin).",
                           "origin_not_allowed")  # fmt: skip
            if problem is not None:
                from starlette.responses import JSONResponse

                status, message, code = problem
                await JSONResponse(error_body(message, code=code), status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


async def _sse(handle, completion_id: str, created: int, model: str, include_usage: bool):
    """Server-sent events in OpenAI's `chat.completion.chunk` format, ending with `data: [DONE]`."""
    from .engine import EngineError

    def chunk(delta: dict, finish_reason=None, usage=None, choices=True) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            if choices
            else [],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for text in handle.astream():
            yield chunk({"content": text})
        result = handle.result
        yield chunk({}, finish_reason=result.finish_reason)
        if include_usage:
            yield chunk({}, usage=_usage(result), choices=False)
    except EngineError as err:
        # Headers are gone already: the error travels as an SSE event (the openai client raises on it).
        yield f"data: {json.dumps(error_body(str(err), err.type, None, err.code))}\n\n"
    finally:
        # [IMPORTANT] runs when the client disconnects too (Starlette cancels the response task): the request's
        # row stops at the next decoding step and its slot is free.
        handle.cancel()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("batching")
    group.add_argument(
        "--engine",
        choices=["continuous", "window"],
        default="continuous",
        help="continuous: requests join and leave a static-cache batch between decoding steps; window: one generate "
        "call per batch (requests arriving meanwhile wait)",
    )
    group.add_argument("--max-batch-size", type=int, default=16, help="most requests decoding at once")
    group.add_argument("--batch-window-ms", type=float, default=10.0, help="wait this long for a batch to fill")
    group.add_argument(
        "--max-cache-len",
        type=int,
        help="continuous engine: KV cache tokens per request, prompt + max_tokens (default: the model's context, at "
        "most 4096, and on a GPU what fits in half of the free memory)",
    )
    group.add_argument(
        "--max-prefill-tokens", type=int, default=8192, help="continuous engine: most prompt tokens prefilled per step"
    )
    group.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get a 503")
    group.add_argument("--request-timeout", type=float, default=300.0, help="seconds until a request fails (504)")
    return parser


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat serve", description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_engine_args(parser)
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--served-model-name", help="the `model` clients must send (default: the folder name)")
    http.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"required bearer key (or ${API_KEY_ENV})"
    )
    http.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 beyond)")
    http.add_argument("--max-images", type=int, default=8, help="most images per request")
    http.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest image (width x height)")
    http.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    http.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when the request has none")
    http.add_argument(
        "--max-preprocess-mb",
        type=float,
        default=2048.0,
        help="memory that decoding the images of all requests in flight may take (503 with Retry-After beyond)",
    )
    http.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name clients use to reach the server besides localhost / its address (repeat; "
        "'.example.com' = it and its subdomains; '*' = any, which reopens DNS rebinding)",
    )
    http.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a browser origin (https://app.example.com) whose pages may call the API (repeat; '*' = any page)",
    )
    http.add_argument("--allowed-local-media-path", help="folder from which image paths / file:// URLs may be read")
    http.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let the server download http(s) images (public addresses only)",
    )
    http.add_argument(
        "--remote-image-timeout", type=float, default=10.0, help="seconds for a whole remote image download"
    )
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def build_engine(args: argparse.Namespace, model, processor) -> "Engine":
    from .engine import Engine

    return Engine(
        model,
        processor,
        max_batch_size=args.max_batch_size,
        batch_window=args.batch_window_ms / 1000.0,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        scheduler=getattr(args, "engine", "continuous"),
        max_cache_len=getattr(args, "max_cache_len", None),
        max_prefill_tokens=getattr(args, "max_prefill_tokens", 8192),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(args.host) and not args.api_key:
        logger.warning("binding to %s without --api-key: anyone who can reach this port can use the model", args.host)
    try:
        model, processor = load_model(**model_kwargs(args))
    except ModelLoadError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    import uvicorn

    config = ServerConfig(
        model_name=args.served_model_name or Path(os.path.normpath(args.model)).name,
        api_key=args.api_key or None,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout=args.remote_image_timeout,
        max_preprocess_bytes=int(args.max_preprocess_mb * 1024 * 1024),
        bind_host=args.host,
        allowed_hosts=tuple(args.allowed_host),
        cors_origins=tuple(args.cors_origin),
    )
    engine = build_engine(args, model, processor).start()
    app = create_app(engine, config)
    print(f"serving {config.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

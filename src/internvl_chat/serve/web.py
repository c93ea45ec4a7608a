"""`internvl-chat web`: the Gradio chat demo (as LLaVA's), in-process or against a running `internvl-chat serve`.

    internvl-chat web --model DIR [--host 127.0.0.1] [--port 7860]                 # loads the model itself
    internvl-chat web --server-url http://127.0.0.1:8000/v1 [--api-key KEY]       # talks to the server

Image upload, Pad / Crop / Resize preprocessing (the model's `image_aspect_ratio`: pad, square, resize),
temperature, top-p and max new tokens, streamed answers, Regenerate, Clear and Stop. An image is attached to the
message sent after it was uploaded (change it to talk about another one); the whole conversation is sent every turn.
While an answer streams, Send / Regenerate / Clear are disabled and Stop cancels it; the conversation lives in
`ChatSessions` (per browser session), so a cancelled answer never writes an old conversation back.

    from internvl_chat.serve.web import InProcessBackend, build_demo
    demo = build_demo(InProcessBackend(engine), title="my model"); demo.queue().launch()
"""

import argparse
import base64
import collections
import hashlib
import io
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..loading import ModelLoadError, add_model_args, load_model, model_kwargs

if TYPE_CHECKING:  # the engine (torch) is imported where it is used: `--help` answers before torch loads
    from .engine import Engine

logger = logging.getLogger(__name__)

MODES = {"Pad": "pad", "Crop": "square", "Resize": "resize"}


class InProcessBackend:
    """Generates with an `Engine` in this process."""

    def __init__(self, engine: "Engine", name: str = "model"):
        self.engine, self.name = engine, name

    def open(self, turns: list[dict], mode: str, temperature: float, top_p: float, max_tokens: int) -> "AnswerStream":
        messages, images = [], []
        for turn in turns:
            content = [{"type": "image"}] if turn.get("image") is not None else []
            content.append({"type": "text", "text": turn["text"]})
            messages.append({"role": turn["role"], "content": content})
            if turn.get("image") is not None:
                images.append(turn["image"])
        from .engine import SamplingParams

        params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        handle = self.engine.submit(self.engine.prepare(messages, images, image_aspect_ratio=mode), params)
        return AnswerStream(handle.stream(), handle.cancel)

    def stream(self, turns: list[dict], mode: str, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        answer = self.open(turns, mode, temperature, top_p, max_tokens)
        try:
            yield from answer
        finally:
            answer.cancel()


class RemoteBackend:
    """Generates through an OpenAI-compatible `internvl-chat serve` (images travel as PNG data URLs)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 300.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0)
        self.name = model or self.client.models.list().data[0].id

    @staticmethod
    def data_url(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def open(self, turns: list[dict], mode: str, temperature: float, top_p: float, max_tokens: int) -> "AnswerStream":
        messages = []
        for turn in turns:
            content = []
            if turn.get("image") is not None:
                content.append({"type": "image_url", "image_url": {"url": self.data_url(turn["image"])}})
            content.append({"type": "text", "text": turn["text"]})
            messages.append({"role": turn["role"], "content": content})
        stream = self.client.chat.completions.create(
            model=self.name,
            messages=messages,
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            stream=True,
            extra_body={"image_aspect_ratio": mode},  # our extension: pad / square / resize
        )

        def deltas():
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

        # Closing the connection frees the server's slot (the server cancels the row when its client goes away).
        return AnswerStream(deltas(), stream.close)

    def stream(self, turns: list[dict], mode: str, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        answer = self.open(turns, mode, temperature, top_p, max_tokens)
        try:
            yield from answer
        finally:
            answer.cancel()


class AnswerStream:
    """An answer being generated: iterate for text deltas; `cancel()` (any thread) stops it and frees its slot."""

    def __init__(self, deltas: Iterator[str], cancel):
        self._deltas, self._cancel = deltas, cancel
        self.cancelled = False

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def cancel(self) -> None:
        self.cancelled = True
        self._cancel()


def _image_key(image) -> str | None:
    if image is None:
        return None
    return hashlib.sha1(image.tobytes()).hexdigest() + f"{image.size}"


def _chat_view(turns: list[dict]) -> list[dict]:
    view = []
    for turn in turns:
        text = turn["text"]
        if turn.get("image") is not None:
            text = "[image] " + text  # the image itself stays in the image box, as in LLaVA's demo
        view.append({"role": turn["role"], "content": text})
    return view


@dataclass
class _Session:
    turns: list = field(default_factory=list)
    image_key: str | None = None
    generation: int = 0  # +1 on Clear: an answer of an older generation may not write into the conversation
    answering: int | None = None  # the generation whose answer is streaming, if any
    active: AnswerStream | None = None
    partial: list | None = None  # the streaming answer's turns + its reply so far (what Stop shows at once)


class ChatSessions:
    """The web UI's conversation logic, one conversation per browser session, kept here rather than in Gradio
    state so that no event can write an old conversation back:

    * while an answer streams, a second one cannot start (`answer`, `add_user` and `regenerate` are no-ops);
    * `clear` cancels the streaming answer (its engine row / server request stops) and starts a new generation: the
      cancelled answer never writes its turns back, and the next question is sent without them;
    * `stop` cancels the streaming answer and keeps what was generated so far.

    `request` is Gradio's `gr.Request` (only `session_hash` is used); `None` means a single default session.
    """

    def __init__(self, backend, max_sessions: int = 10_000):
        self.backend = backend
        self.max_sessions = max_sessions
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _get(self, request) -> _Session:
        key = getattr(request, "session_hash", None) or "default"
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
            while len(self._sessions) > self.max_sessions:  # tabs that never unloaded: the oldest go first
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(key)
        return session

    def view(self, request=None) -> list[dict]:
        with self._lock:
            return _chat_view(self._get(request).turns)

    def streaming(self, request=None) -> bool:
        with self._lock:
            session = self._get(request)
            return session.answering is not None and session.answering == session.generation

    def add_user(self, text, image, request=None) -> tuple[list[dict], str]:
        """Appends a user turn (the image only when it changed); returns (chat view, textbox value)."""
        text = (text or "").strip()
        with self._lock:
            session = self._get(request)
            if not text or session.answering == session.generation:
                return _chat_view(session.turns), (text if session.answering == session.generation else "")
            key = _image_key(image)
            attach = image if key is not None and key != session.image_key else None
            if attach is not None:
                session.image_key = key
            session.turns = [*session.turns, {"role": "user", "text": text, "image": attach}]
            return _chat_view(session.turns), ""

    def regenerate(self, request=None) -> list[dict]:
        with self._lock:
            session = self._get(request)
            if session.answering != session.generation and session.turns and session.turns[-1]["role"] == "assistant":
                session.turns = session.turns[:-1]
            return _chat_view(session.turns)

    def clear(self, request=None) -> list[dict]:
        with self._lock:
            session = self._get(request)
            session.generation += 1
            session.turns, session.image_key = [], None
            active, session.active = session.active, None
        if active is not None:
            active.cancel()
        return []

    def stop(self, request=None) -> list[dict]:
        """Cancels the streaming answer; returns the conversation with the partial answer.

        [IMPORTANT] the answer's own generator writes the reply into `turns` only when it next runs; the view
        returned here reaches the browser on its own, possibly after that generator's last update, so it must
        already hold the partial reply (else the answer vanishes from the page)."""
        with self._lock:
            session = self._get(request)
            active, partial = session.active, session.partial
        if active is not None:
            active.cancel()
        with self._lock:
            if session.partial is not None and session.partial is partial:
                turns, reply = partial
                return _chat_view([*turns, dict(reply)])
            return _chat_view(session.turns)

    def forget(self, request=None) -> None:
        """The browser tab went away: cancel its answer and drop its conversation."""
        self.clear(request)
        with self._lock:
            self._sessions.pop(getattr(request, "session_hash", None) or "default", None)

    def answer(self, mode, temperature, top_p, max_tokens, request=None) -> Iterator[list[dict]]:
        """Streams the answer to the last user turn; yields the chat view after each delta."""
        with self._lock:
            session = self._get(request)
            busy = session.answering == session.generation
            if busy or not session.turns or session.turns[-1]["role"] != "user":
                view = _chat_view(session.turns)
                generation = None
            else:
                generation = session.answering = session.generation
                turns = list(session.turns)
        if generation is None:
            yield view
            return
        reply = {"role": "assistant", "text": ""}
        answer = None
        try:
            answer = self.backend.open(turns, MODES.get(mode, "pad"), temperature, top_p, max_tokens)
            with self._lock:
                if session.generation == generation:
                    session.active, session.partial = answer, (turns, reply)
            if session.generation != generation:  # cleared while the request was being prepared
                answer.cancel()
            for delta in answer:
                if session.generation != generation or answer.cancelled:
                    break
                reply["text"] += delta
                yield _chat_view([*turns, reply])
        except Exception as err:  # noqa: BLE001 - engine / openai errors are shown in the chat; the UI keeps running
            from .engine import Cancelled, EngineError

            if not (answer is not None and answer.cancelled) and not isinstance(err, Cancelled):
                logger.warning("generation failed: %s", err)
                detail = (
                    str(err) if isinstance(err, (EngineError, ValueError, OSError)) else f"{type(err).__name__}: {err}"
                )
                reply["text"] += f" [error: {detail}]"
        finally:
            if answer is not None:
                answer.cancel()  # no-op when it finished; frees the slot when the UI went away mid-answer
            with self._lock:
                if session.answering == generation:
                    session.answering = None
                if session.active is answer:
                    session.active = session.partial = None
                if session.generation == generation:
                    session.turns = [*turns, reply]
                view = _chat_view(session.turns)
        yield view


def build_demo(
    backend, title: str = "internvl-chat", temperature: float = 0.2, top_p: float = 0.7, max_tokens: int = 512
):
    """The Gradio Blocks app; `backend` has `.name` and `.open(turns, mode, temperature, top_p, max_tokens)`.

    `temperature`, `top_p`, `max_tokens`: the sliders' initial values (LLaVA's demo defaults). While an answer
    streams, Send / Regenerate / Clear are disabled and Stop is enabled (see `ChatSessions` for the rules)."""
    import gradio as gr

    sessions = ChatSessions(backend)

    def add_user(text, image, request: gr.Request):
        return sessions.add_user(text, image, request)

    def answer(mode, temperature, top_p, max_tokens, request: gr.Request):
        yield from sessions.answer(mode, temperature, top_p, max_tokens, request)

    def regenerate(request: gr.Request):
        return sessions.regenerate(request)

    def clear(request: gr.Request):
        return sessions.clear(request), "", None

    def stop(request: gr.Request):
        return sessions.stop(request)

    def lock():
        return (
            gr.Button(interactive=False),
            gr.Button(interactive=False),
            gr.Button(interactive=False),
            gr.Button(interactive=True),
        )

    def unlock(request: gr.Request):
        busy = sessions.streaming(request)  # another event's answer may still be streaming
        return (*(gr.Button(interactive=not busy) for _ in range(3)), gr.Button(interactive=busy))

    def forget(request: gr.Request):
        sessions.forget(request)

    # System fonts: the default theme would fetch Google fonts, which offline machines cannot reach.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nModel: `{backend.name}`")
        with gr.Row():
            with gr.Column(scale=3):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="image")
                mode = gr.Radio(list(MODES), value="Pad", label="Preprocess for non-square image", elem_id="mode")
                with gr.Accordion("Parameters", open=False):
                    temperature_slider = gr.Slider(
                        0.0, 1.0, value=temperature, step=0.1, label="Temperature", elem_id="temperature"
                    )
                    top_p_slider = gr.Slider(0.0, 1.0, value=top_p, step=0.1, label="Top P", elem_id="top_p")
                    max_tokens_slider = gr.Slider(
                        1, 1024, value=max_tokens, step=1, label="Max output tokens", elem_id="max_tokens"
                    )
            with gr.Column(scale=8):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=550)
                with gr.Row():
                    textbox = gr.Textbox(
                        show_label=False, placeholder="Enter text and press ENTER", elem_id="textbox", scale=8
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                with gr.Row():
                    regen = gr.Button("Regenerate", elem_id="regenerate")
                    clear_btn = gr.Button("Clear", elem_id="clear")
                    stop_btn = gr.Button("Stop", elem_id="stop", interactive=False)

        settings = [mode, temperature_slider, top_p_slider, max_tokens_slider]
        buttons = [send, regen, clear_btn, stop_btn]
        for trigger in (send.click, textbox.submit):
            trigger(add_user, [textbox, image], [chatbot, textbox], queue=False).then(
                lock, None, buttons, queue=False
            ).then(answer, settings, [chatbot]).then(unlock, None, buttons, queue=False)
        regen.click(regenerate, None, [chatbot], queue=False).then(lock, None, buttons, queue=False).then(
            answer, settings, [chatbot]
        ).then(unlock, None, buttons, queue=False)
        clear_btn.click(clear, None, [chatbot, textbox, image], queue=False)
        stop_btn.click(stop, None, [chatbot], queue=False)
        demo.unload(forget)
    demo.internvl_theme = theme  # Gradio 6 takes the theme at launch()
    demo.internvl_sessions = sessions
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True, **kwargs):
    """Queues and launches `demo` (Gradio 6: theme at launch); returns (app, local_url, share_url)."""
    return demo.queue(default_concurrency_limit=8).launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        share=False,
        theme=getattr(demo, "internvl_theme", None),
        quiet=True,
        **kwargs,
    )


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="internvl-chat web", description=__doc__.splitlines()[0])
    add_model_args(parser, required=False)
    parser.add_argument("--server-url", help="use a running `internvl-chat serve` (its /v1 URL) instead of --model")
    parser.add_argument("--api-key", help="the server's API key (with --server-url)")
    parser.add_argument("--served-model-name", help="model name on the server (default: its first model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-batch-size", type=int, default=8, help="in-process: concurrent users batched")
    parser.add_argument("--temperature", type=float, default=0.2, help="initial temperature (0 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="initial max output tokens")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if bool(args.model) == bool(args.server_url):
        sys.stderr.write("error: pass exactly one of --model (in-process) and --server-url\n")
        return 2
    engine = None
    if args.server_url:
        try:
            backend = RemoteBackend(args.server_url, args.api_key, args.served_model_name)
        except Exception as err:  # connection refused, 401...: say so instead of a traceback
            sys.stderr.write(f"error: cannot reach {args.server_url}: {err}\n")
            return 2
    else:
        try:
            model, processor = load_model(**model_kwargs(args))
        except ModelLoadError as err:
            sys.stderr.write(f"error: {err}\n")
            return 2
        from pathlib import Path

        from .engine import Engine

        engine = Engine(model, processor, max_batch_size=args.max_batch_size).start()
        backend = InProcessBackend(engine, Path(args.model).name)
    try:
        demo = build_demo(backend, temperature=args.temperature, max_tokens=args.max_new_tokens)
        launch(demo, host=args.host, port=args.port, block=True)
    finally:
        if engine is not None:
            engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`internvl-chat web`: the Gradio chat demo (as LLaVA's), in-process or against a running `internvl-chat serve`.

    internvl-chat web --model DIR [--host 127.0.0.1] [--port 7860]                 # loads the model itself
    internvl-chat web --server-url http://127.0.0.1:8000/v1 [--api-key KEY]       # talks to the server

Image upload, Pad / Crop / Resize preprocessing (the model's `image_aspect_ratio`: pad, square, resize),
temperature, top-p and max new tokens, streamed answers, Regenerate and Clear. An image is attached to the message
sent after it was uploaded (change it to talk about another one); the whole conversation is sent every turn.

    from internvl_chat.serve.web import InProcessBackend, build_demo
    demo = build_demo(InProcessBackend(engine), title="my model"); demo.queue().launch()
"""

import argparse
import base64
import hashlib
import io
import logging
import sys
from collections.abc import Iterator

from ..loading import ModelLoadError, add_model_args, load_model, model_kwargs
from .engine import Engine, EngineError, SamplingParams

logger = logging.getLogger(__name__)

MODES = {"Pad": "pad", "Crop": "square", "Resize": "resize"}


class InProcessBackend:
    """Generates with an `Engine` in this process."""

    def __init__(self, engine: Engine, name: str = "model"):
        self.engine, self.name = engine, name

    def stream(self, turns: list[dict], mode: str, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
        messages, images = [], []
        for turn in turns:
            content = [{"type": "image"}] if turn.get("image") is not None else []
            content.append({"type": "text", "text": turn["text"]})
            messages.append({"role": turn["role"], "content": content})
            if turn.get("image") is not None:
                images.append(turn["image"])
        params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        yield from self.engine.generate(messages, images, params, image_aspect_ratio=mode)


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

    def stream(self, turns: list[dict], mode: str, temperature: float, top_p: float, max_tokens: int) -> Iterator[str]:
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
        try:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            stream.close()  # closing the connection frees the server's slot when the UI stops early


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


def build_demo(
    backend, title: str = "internvl-chat", temperature: float = 0.2, top_p: float = 0.7, max_tokens: int = 512
):
    """The Gradio Blocks app; `backend` has `.name` and `.stream(turns, mode, temperature, top_p, max_tokens)`.

    `temperature`, `top_p`, `max_tokens`: the sliders' initial values (LLaVA's demo defaults)."""
    import gradio as gr

    def add_user(text, image, state):
        state = dict(state or {"turns": [], "image_key": None})
        text = (text or "").strip()
        if not text:
            return state, _chat_view(state["turns"]), ""
        key = _image_key(image)
        attach = image if key is not None and key != state["image_key"] else None
        if attach is not None:
            state["image_key"] = key
        state["turns"] = [*state["turns"], {"role": "user", "text": text, "image": attach}]
        return state, _chat_view(state["turns"]), ""

    def answer(state, mode, temperature, top_p, max_tokens):
        turns = list((state or {}).get("turns", []))
        if not turns or turns[-1]["role"] != "user":
            yield state, _chat_view(turns)
            return
        reply = {"role": "assistant", "text": ""}
        shown = [*turns, reply]
        try:
            for delta in backend.stream(turns, MODES.get(mode, "pad"), temperature, top_p, max_tokens):
                reply["text"] += delta
                yield state, _chat_view(shown)
        except (EngineError, ValueError, OSError) as err:
            logger.warning("generation failed: %s", err)
            reply["text"] += f" [error: {err}]"
        except Exception as err:  # openai errors (remote backend): shown in the chat, the UI keeps running
            logger.warning("generation failed: %s", err)
            reply["text"] += f" [error: {type(err).__name__}: {err}]"
        state = {**state, "turns": shown}
        yield state, _chat_view(shown)

    def regenerate(state):
        turns = list((state or {}).get("turns", []))
        if turns and turns[-1]["role"] == "assistant":
            turns.pop()
        state = {**(state or {"image_key": None}), "turns": turns}
        return state, _chat_view(turns)

    def clear():
        return {"turns": [], "image_key": None}, [], "", None

    # System fonts: the default theme would fetch Google fonts, which offline machines cannot reach.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nModel: `{backend.name}`")
        state = gr.State({"turns": [], "image_key": None})
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

        settings = [mode, temperature_slider, top_p_slider, max_tokens_slider]
        for trigger in (send.click, textbox.submit):
            trigger(add_user, [textbox, image, state], [state, chatbot, textbox], queue=False).then(
                answer, [state, *settings], [state, chatbot]
            )
        regen.click(regenerate, [state], [state, chatbot], queue=False).then(
            answer, [state, *settings], [state, chatbot]
        )
        clear_btn.click(clear, None, [state, chatbot, textbox, image], queue=False)
    demo.internvl_theme = theme  # Gradio 6 takes the theme at launch()
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

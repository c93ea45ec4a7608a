"""The web UI's conversation logic (`ChatSessions`, what the Gradio events call) with the real engine and the tiny
model, no browser: Clear while an answer streams cancels it and never writes the old conversation back, a second
answer cannot start while one streams, Stop keeps the partial answer, sessions are independent. The same rules in a
real browser: tests/test_web.py.
"""

import time
from types import SimpleNamespace

import pytest
from PIL import Image

from test_serve import make_tiny_model

LONG = 1000  # max tokens: far more than the test ever lets stream


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from internvl_chat.loading import load_model
    from internvl_chat.serve.engine import Engine

    folder = make_tiny_model(tmp_path_factory.mktemp("web-sessions") / "tiny-llava")
    model, processor = load_model(str(folder))
    engine = Engine(model, processor, max_batch_size=4).start()
    yield engine
    engine.stop()


class RecordingBackend:
    """The real in-process backend, remembering which turns each answer was asked with."""

    def __init__(self, engine):
        from internvl_chat.serve.web import InProcessBackend

        self.inner = InProcessBackend(engine, "tiny-llava")
        self.name = self.inner.name
        self.asked: list[list[dict]] = []

    def open(self, turns, *args):
        self.asked.append([dict(t) for t in turns])
        return self.inner.open(turns, *args)


@pytest.fixture
def sessions(engine):
    from internvl_chat.serve.web import ChatSessions

    return ChatSessions(RecordingBackend(engine))


def wait_idle(engine):
    for _ in range(300):  # bounded: 30 s
        if engine.status()["running"] == 0 and engine.status()["queued"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the engine kept generating: {engine.status()}")


def test_clear_while_streaming_cancels_and_forgets(sessions, engine):
    me = SimpleNamespace(session_hash="a")
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    before = engine.stats.cancelled
    sessions.add_user("Describe the image in detail.", image, me)
    stream = sessions.answer("Pad", 0.0, 1.0, LONG, me)
    first = next(stream)
    assert first[-1]["role"] == "assistant" and first[-1]["content"]
    assert sessions.streaming(me)

    assert sessions.clear(me) == []
    rest = list(stream)  # the cancelled answer ends at once...
    assert rest[-1] == [] and sessions.view(me) == []  # ...and does not write the old conversation back
    assert not sessions.streaming(me)
    assert engine.stats.cancelled > before
    wait_idle(engine)  # its engine row stopped (LONG tokens were asked for)

    # The next question is sent alone: neither the old question nor its image travel with it.
    sessions.add_user("Hello", None, me)
    answer = list(sessions.answer("Pad", 0.0, 1.0, 4, me))[-1]
    asked = sessions.backend.asked[-1]
    assert [(t["role"], t["text"], t.get("image")) for t in asked] == [("user", "Hello", None)]
    assert [m["role"] for m in answer] == ["user", "assistant"]


def test_no_second_answer_while_one_streams(sessions, engine):
    me = SimpleNamespace(session_hash="b")
    sessions.add_user("Tell me a long story.", None, me)
    stream = sessions.answer("Pad", 0.0, 1.0, LONG, me)
    next(stream)
    submitted = engine.stats.submitted
    view = sessions.view(me)
    # Regenerate, a second answer and a new question are all refused while the first answer streams.
    assert sessions.regenerate(me) == view
    assert list(sessions.answer("Pad", 0.0, 1.0, LONG, me)) == [view]
    assert sessions.add_user("Another question", None, me) == (view, "Another question")  # the text stays typed
    assert engine.stats.submitted == submitted
    assert len(sessions.backend.asked) == 1

    # Stop: the partial answer stays, the row is cancelled, and Regenerate works again afterwards.
    partial = next(stream)[-1]["content"]
    # Stop's own view already holds the partial answer: it can reach the browser after the stream's last update.
    stopped = sessions.stop(me)
    assert [m["role"] for m in stopped] == ["user", "assistant"] and stopped[-1]["content"] == partial
    final = list(stream)[-1]
    assert final[-1]["role"] == "assistant" and final[-1]["content"].startswith(partial.strip())
    assert not sessions.streaming(me)
    wait_idle(engine)
    assert [m["role"] for m in sessions.regenerate(me)] == ["user"]
    assert [m["role"] for m in list(sessions.answer("Pad", 0.0, 1.0, 3, me))[-1]] == ["user", "assistant"]


def test_sessions_are_independent(sessions):
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")
    sessions.add_user("Hi from Alice", None, alice)
    stream = sessions.answer("Pad", 0.0, 1.0, LONG, alice)
    next(stream)
    sessions.clear(bob)  # Bob's Clear does not touch Alice's answer
    sessions.add_user("Hi from Bob", None, bob)
    assert [m["content"] for m in sessions.view(bob)] == ["Hi from Bob"]
    assert next(stream)[0]["content"] == "Hi from Alice"
    sessions.forget(alice)  # the tab closed: its answer is cancelled
    assert list(stream)[-1] == []

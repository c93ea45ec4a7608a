"""The Gradio web UI in headless Chromium (Selenium driving Debian's chromium + chromium-driver).

Uploads an image, asks a question, watches the answer stream in (a MutationObserver records every update of the
bot message), checks the final answer against the engine's own, then Regenerate and Clear; while a long answer
streams, Send / Regenerate / Clear are disabled and Stop ends it; a page from another origin cannot make the API
server run anything. The screenshot is kept as tests/artifacts/web_ui.png. Skipped, with the reason, when chromium /
chromedriver / selenium are missing (CI: `apt-get install -y chromium chromium-driver` and `pip install selenium`).
"""

import os
import shutil
import time
from pathlib import Path

import pytest

from test_serve import free_port, make_tiny_model, png_bytes

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium not installed: apt-get install -y chromium chromium-driver",
)

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    from internvl_chat.loading import load_model
    from internvl_chat.serve.engine import Engine
    from internvl_chat.serve.web import InProcessBackend, build_demo, launch

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    folder = make_tiny_model(tmp_path_factory.mktemp("web") / "tiny-llava")
    model, processor = load_model(str(folder))
    engine = Engine(model, processor, max_batch_size=4).start()
    # Greedy and long enough that the answer arrives in many updates.
    demo = build_demo(InProcessBackend(engine, "tiny-llava"), temperature=0.0, max_tokens=96)
    _, url, _ = launch(demo, port=free_port(), block=False)
    yield url, engine
    demo.close()
    engine.stop()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


RECORD_BOT_UPDATES = """
window.__botTexts = [];
const log = document.querySelector('#chatbot');
new MutationObserver(() => {
  const bots = log.querySelectorAll('[data-testid=bot]');
  if (bots.length) window.__botTexts.push(bots[bots.length - 1].innerText);
}).observe(log, {subtree: true, childList: true, characterData: true});
"""


def bot_messages(driver):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    # Gradio re-renders the chat while it streams: an element found a moment ago can be gone; read again.
    for _ in range(20):
        try:
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")]
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError("the chat kept re-rendering; could not read the bot messages")


def wait_stable_answer(driver, count: int, timeout: float = 60.0) -> str:
    """Waits until there are `count` bot messages and the last one stopped changing."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        messages = bot_messages(driver)
        current = messages[-1] if len(messages) == count else None
        if current != last:
            last, since = current, time.monotonic()
        elif current and time.monotonic() - since > 1.5:
            return current
        time.sleep(0.1)
    raise AssertionError(f"no stable answer; bot messages: {bot_messages(driver)}")


def test_upload_ask_stream_regenerate_clear(web, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from internvl_chat.serve.engine import SamplingParams

    url, engine = web
    image_path = tmp_path / "picture.png"
    image_path.write_bytes(png_bytes(width=64, height=40))
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#textbox textarea"))

    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image_path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    browser.execute_script(RECORD_BOT_UPDATES)
    browser.find_element(By.CSS_SELECTOR, "#textbox textarea").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()
    answer = wait_stable_answer(browser, count=1)

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_ui.png"))

    # Streamed: the bot message grew through several partial texts before the final one.
    seen = [t for t in browser.execute_script("return window.__botTexts") if t]
    partial = {t for t in seen if t != answer and answer.startswith(t.strip())}
    assert len(partial) >= 3, seen[:10]
    # The same answer as the engine gives for this image (Pad mode) and question, greedy.
    image = Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = "".join(engine.generate(messages, [image], SamplingParams(max_new_tokens=96), image_aspect_ratio="pad"))
    assert " ".join(answer.split()) == " ".join(expected.split())
    user_messages = browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user]")
    assert "[image]" in user_messages[0].text and QUESTION in user_messages[0].text

    # Regenerate: greedy, so the same answer comes back, still one bot message.
    browser.execute_script("window.__botTexts = [];")
    browser.find_element(By.ID, "regenerate").click()
    time.sleep(0.5)
    assert " ".join(wait_stable_answer(browser, count=1).split()) == " ".join(expected.split())

    # Crop mode changes the preprocessing; a follow-up question reuses the conversation.
    browser.find_element(By.XPATH, "//*[@id='mode']//label[contains(., 'Crop')]").click()
    browser.find_element(By.CSS_SELECTOR, "#textbox textarea").send_keys("And the colours?")
    browser.find_element(By.ID, "send").click()
    assert wait_stable_answer(browser, count=2)

    browser.find_element(By.ID, "clear").click()
    WebDriverWait(browser, 20).until(lambda d: not bot_messages(d))


class PacedBackend:
    """The real in-process backend, its deltas shown at most 20 a second: the tiny model writes 1000 tokens in well
    under a second, too fast for a browser to act while an answer streams."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def open(self, *args):
        from internvl_chat.serve.web import AnswerStream

        answer = self.inner.open(*args)

        def paced():
            for delta in answer:
                time.sleep(0.05)
                yield delta

        return AnswerStream(paced(), answer.cancel)


@pytest.fixture(scope="module")
def web_long(web):
    """A second demo on the same engine whose answers run long (1024 tokens, paced), to act while one streams."""
    from internvl_chat.serve.web import InProcessBackend, build_demo, launch

    _, engine = web
    demo = build_demo(PacedBackend(InProcessBackend(engine, "tiny-llava")), temperature=0.0, max_tokens=1024)
    _, url, _ = launch(demo, port=free_port(), block=False)
    yield url
    demo.close()


def button(driver, elem_id):
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, elem_id)
    return element if element.tag_name == "button" else element.find_element(By.TAG_NAME, "button")


def test_buttons_locked_while_streaming_then_stop_and_clear(web, web_long, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from internvl_chat.serve.engine import SamplingParams

    _, engine = web
    browser.get(web_long)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#textbox textarea"))
    browser.find_element(By.CSS_SELECTOR, "#textbox textarea").send_keys("Tell me everything.")
    button(browser, "send").click()
    wait.until(lambda d: (bot_messages(d) or [""])[-1].strip())  # the answer is streaming

    # While it streams: no second answer can be started, and Clear cannot pull the conversation away under it.
    locked = ("regenerate", "clear", "send")
    WebDriverWait(browser, 20).until(lambda d: not any(button(d, b).is_enabled() for b in locked))
    assert button(browser, "stop").is_enabled()
    submitted = engine.stats.submitted
    browser.execute_script("document.querySelector('#regenerate').click()")
    assert engine.stats.submitted == submitted

    # Stop: the answer ends early, the buttons come back, the partial answer stays.
    button(browser, "stop").click()
    wait.until(lambda d: button(d, "regenerate").is_enabled() and button(d, "clear").is_enabled())
    assert not button(browser, "stop").is_enabled()
    partial = wait_stable_answer(browser, count=1)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me everything."}]}]
    full = "".join(engine.generate(messages, [], SamplingParams(max_new_tokens=1024), image_aspect_ratio="pad"))
    assert partial and len(" ".join(partial.split())) < len(" ".join(full.split())) // 2
    assert engine.stats.submitted == submitted + 1  # only our reference answer since

    button(browser, "clear").click()
    WebDriverWait(browser, 20).until(lambda d: not bot_messages(d))
    assert not browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user]")


CROSS_ORIGIN_PAGE = """<!doctype html><html><body><script>
window.attack = async function (api) {
  const body = JSON.stringify({model: "tiny-llava", max_tokens: 2,
                               messages: [{role: "user", content: "Reply with something"}]});
  const results = [];
  // A "simple" request: no CORS preflight, the browser sends it and only hides the answer from the page.
  try { await fetch(api, {method: "POST", mode: "no-cors", headers: {"content-type": "text/plain"}, body});
        results.push("sent"); } catch (e) { results.push("blocked: " + e); }
  try { const r = await fetch(api, {method: "POST", headers: {"content-type": "application/json"}, body});
        results.push("read " + r.status); } catch (e) { results.push("blocked: " + e); }
  return results;
};
</script></body></html>"""


def test_a_web_page_cannot_drive_the_api(web, browser, tmp_path):
    """A page from another origin (another loopback port) posts to the API server from a real browser: nothing
    reaches the model."""
    import threading

    import uvicorn

    from internvl_chat.serve.server import ServerConfig, create_app

    _, engine = web
    api_port, page_port = free_port(), free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, ServerConfig(model_name="tiny-llava")), port=api_port, log_level="error")
    )
    threading.Thread(target=server.run, daemon=True).start()
    (tmp_path / "index.html").write_text(CROSS_ORIGIN_PAGE)
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    page_server = http.server.ThreadingHTTPServer(("127.0.0.1", page_port), handler)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    try:
        for _ in range(100):  # bounded: 10 s for uvicorn to start
            if server.started:
                break
            time.sleep(0.1)
        submitted = engine.stats.submitted
        browser.get(f"http://127.0.0.1:{page_port}/index.html")
        api = f"http://localhost:{api_port}/v1/chat/completions"
        browser.set_script_timeout(30)
        results = browser.execute_async_script("window.attack(arguments[0]).then(arguments[1]);", api)
        assert results[0] == "sent", results  # the browser did send the text/plain POST...
        assert results[1].startswith("blocked"), results  # ...and refused the JSON one for lack of CORS
        assert engine.stats.submitted == submitted  # the server ran neither
    finally:
        page_server.shutdown()
        page_server.server_close()
        server.should_exit = True

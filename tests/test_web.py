"""The Gradio web UI in headless Chromium (Selenium driving Debian's chromium + chromium-driver).

Uploads an image, asks a question, watches the answer stream in (a MutationObserver records every update of the
bot message), checks the final answer against the engine's own, then Regenerate and Clear. The screenshot is kept
as tests/artifacts/web_ui.png. Skipped, with the reason, when chromium / chromedriver / selenium are missing
(CI: `apt-get install -y chromium chromium-driver` and `pip install selenium`).
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

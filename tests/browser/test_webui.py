"""Browser smoke test: Debian's chromium through Playwright against the web UI started by the test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def ui(platform, request) -> Iterator[procs.Service]:
    w = procs.webui(platform.api_url).start()
    request.node.services = [w]
    w.wait(path="/", timeout=120)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def page(ui):
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1100, "height": 900})
        pg.goto(ui.url)
        yield pg
        browser.close()


def bot_messages(page):
    return page.locator("#chatbot [data-testid='bot']")


def wait_reply_done(page, timeout_s: float = 60) -> str:
    """Wait until the last bot message stops changing (the stream has ended)."""
    last, stable = None, 0
    for _ in range(int(timeout_s / 0.5)):
        text = bot_messages(page).last.inner_text() if bot_messages(page).count() else ""
        stable = stable + 1 if text and text == last else 0
        if stable >= 4:
            return text
        last = text
        page.wait_for_timeout(500)
    raise AssertionError(f"reply did not finish: {last!r}")


def send(page, text: str) -> None:
    page.locator("#input textarea").fill(text)
    page.locator("#input textarea").press("Enter")


def test_send_a_message_and_see_the_streamed_reply(page, platform):
    # the model dropdown fills itself from the gateway
    page.wait_for_function(
        "() => document.querySelector('#model input') && document.querySelector('#model input').value !== ''",
        timeout=30_000)
    assert platform.model in page.locator("#model input").input_value()
    page.locator("#params").get_by_text("Parameters").click()  # greedy decoding: a deterministic answer
    temperature = page.locator("#temperature input[type=number]")
    temperature.fill("0")
    temperature.press("Enter")
    # the slider takes the typed value asynchronously: sending before it has would sample at the default 0.7
    page.wait_for_function("() => document.querySelector('#temperature input[type=range]').value === '0'",
                           timeout=10_000)
    send(page, "What is the capital of France?")
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length > 0",
                           timeout=60_000)
    text = wait_reply_done(page)
    assert "Paris" in text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat.png"))


def test_second_turn_is_part_of_the_same_chat(page):
    send(page, "And of Germany?")
    page.wait_for_function(
        "() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length >= 2 &&"
        " document.querySelectorAll('#chatbot [data-testid=\"user\"]').length >= 2", timeout=60_000)
    assert wait_reply_done(page)
    users = page.locator("#chatbot [data-testid='user']").all_inner_texts()
    assert any("France" in u for u in users) and any("Germany" in u for u in users)

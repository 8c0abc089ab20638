"""The web UI in a real browser: Debian's chromium through Playwright, against a web UI, a second worker
(so the arena has two models) and the session platform, all started by this module. The UI's database is
a real SQLite file that the tests read back with sqlite3."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import procs

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
ARENA_MODEL = "SmolLM2-135M-arena"
BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("webui") / "chats.sqlite3"


@pytest.fixture(scope="module")
def arena_worker(platform, request) -> Iterator[procs.Service]:
    """A second model name for the arena: the embedded model again, served by its own worker."""
    yield from procs.extra_worker(platform, request, ARENA_MODEL)


@pytest.fixture(scope="module")
def ui(platform, arena_worker, request, db) -> Iterator[procs.Service]:
    ui = procs.webui(platform.api_url, "--database", str(db)).start()
    request.node.services = [arena_worker, ui]
    try:
        ui.wait(path="/", timeout=120)
        yield ui
    finally:
        ui.stop()


@pytest.fixture(scope="module")
def browser(ui):
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, ui):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})  # one browser user for the module
    pg = context.new_page()
    pg.goto(ui.url)
    yield pg
    context.close()


def query(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def wait_stable(page, selector: str, timeout_s: float = 90) -> str:
    """Wait until the last element matching `selector` has text that stops changing (the stream ended)."""
    last, stable = None, 0
    for _ in range(int(timeout_s / 0.5)):
        loc = page.locator(selector)
        text = loc.last.inner_text() if loc.count() else ""
        stable = stable + 1 if text and text == last else 0
        if stable >= 4:
            return text
        last = text
        page.wait_for_timeout(500)
    raise AssertionError(f"{selector} did not settle: {last!r}")


def wait_count(page, selector: str, n: int, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(f"() => document.querySelectorAll({json.dumps(selector)}).length >= {n}",
                           timeout=timeout_ms)


def send(page, text: str, box: str = "#input") -> None:
    page.locator(f"{box} textarea").fill(text)
    page.locator(f"{box} textarea").press("Enter")


def set_slider(page, elem_id: str, value: float) -> None:
    """Type a value into a slider's number box and wait until the slider holds it. The page may still be
    hydrating (Gradio renders on the server first): a value typed before the box's listeners are attached
    is lost, so type again until it takes."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(10):
        box.fill(str(value))
        box.press("Tab")
        try:
            page.wait_for_function(
                f"() => document.querySelector('#{elem_id} input[type=range]').value === '{value}'",
                timeout=3_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"slider {elem_id} did not take {value}")


def only_conversation(db: Path) -> str:
    rows = query(db, "SELECT id FROM conversations WHERE mode = 'chat' ORDER BY created_at")
    assert rows, "no conversation stored"
    return rows[-1][0]


def test_send_a_message_and_see_the_streamed_reply(page, platform, db):
    page.wait_for_function(
        "() => document.querySelector('#model input') && document.querySelector('#model input').value !== ''",
        timeout=30_000)
    assert platform.model in page.locator("#model input").input_value()
    page.locator("#params").get_by_text("Parameters").click()
    set_slider(page, "temperature", 0)  # greedy decoding: a deterministic answer
    send(page, "What is the capital of France?")
    wait_count(page, BOT, 1)
    assert "Paris" in wait_stable(page, BOT)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat.png"))
    # stored: the conversation, both messages, the parameters and the reply's timings and usage
    conv = only_conversation(db)
    rows = query(db, "SELECT role, content, model, ttft_s, completion_tokens, finish_reason FROM messages "
                     "WHERE conversation_id = ? ORDER BY position", conv)
    assert [r[0] for r in rows] == ["user", "assistant"] and "Paris" in rows[1][1]
    assert rows[1][2] == platform.model and rows[1][3] > 0 and rows[1][4] > 0 and rows[1][5] == "stop"
    (params,) = query(db, "SELECT params FROM conversations WHERE id = ?", conv)[0]
    assert json.loads(params)["temperature"] == 0


def test_second_turn_is_part_of_the_same_chat(page, db):
    send(page, "And of Germany?")
    wait_count(page, BOT, 2)
    wait_stable(page, BOT)
    users = page.locator(USER).all_inner_texts()
    assert any("France" in u for u in users) and any("Germany" in u for u in users)
    conv = only_conversation(db)
    rows = query(db, "SELECT role, content, prompt_tokens FROM messages WHERE conversation_id = ? ORDER BY position",
                 conv)
    assert [r[0] for r in rows] == ["user", "assistant", "user", "assistant"]
    # the first turn reached the second turn's prompt (FastChat's UI did the same; the model is too weak to be
    # asked to recall it): the second reply's prompt holds more tokens than the whole first exchange
    first = query(db, "SELECT prompt_tokens, completion_tokens FROM messages WHERE conversation_id = ? AND position = 1",
                  conv)[0]
    assert rows[3][2] > first[0] + first[1]


def test_votes_on_a_reply_are_stored(page, db):
    conv = only_conversation(db)
    page.locator(BOT).last.hover()
    page.locator("#chatbot button[aria-label='Like']").last.click()
    page.wait_for_function("() => document.querySelector('#info').innerText.includes('upvote')", timeout=10_000)
    page.locator("#chatbot button[aria-label='Feedback']").last.click()
    page.get_by_text("Flag", exact=True).last.click()
    page.wait_for_function("() => document.querySelector('#info').innerText.includes('flag')", timeout=10_000)
    votes = query(db, "SELECT m.position, v.kind FROM votes v JOIN messages m ON m.id = v.message_id "
                      "WHERE m.conversation_id = ?", conv)
    assert sorted(votes) == [(3, "flag"), (3, "upvote")]


def test_regenerate_replaces_the_last_reply(page, db):
    conv = only_conversation(db)
    before = wait_stable(page, BOT)
    page.locator("#regenerate").click()
    page.wait_for_timeout(1000)
    after = wait_stable(page, BOT)
    assert page.locator(BOT).count() == 2
    assert after == before  # greedy: the same reply again, not a third message
    assert len(query(db, "SELECT id FROM messages WHERE conversation_id = ?", conv)) == 4


def test_edit_and_resend_the_last_message(page, db):
    conv = only_conversation(db)
    page.locator("#edit").click()
    page.wait_for_function("() => document.querySelector('#input textarea').value === 'And of Germany?'",
                           timeout=10_000)
    assert page.locator(USER).count() == 1
    send(page, "And of Italy?")
    wait_count(page, BOT, 2)
    wait_stable(page, BOT)
    users = page.locator(USER).all_inner_texts()
    assert any("Italy" in u for u in users) and not any("Germany" in u for u in users)
    contents = [r[0] for r in query(db, "SELECT content FROM messages WHERE conversation_id = ? ORDER BY position",
                                    conv)]
    assert len(contents) == 4 and contents[2] == "And of Italy?"
    assert not query(db, "SELECT id FROM votes")  # the votes went with the reply they were about


def test_stop_mid_stream_aborts_the_request(page, platform, db):
    page.locator("#new_chat").click()
    page.wait_for_function(f"() => document.querySelectorAll({json.dumps(BOT)}).length === 0", timeout=10_000)
    set_slider(page, "max_tokens", 1024)
    send(page, "Write a very long story about a dragon who learns to bake bread.")
    page.wait_for_function(f"() => {{ const b = document.querySelectorAll({json.dumps(BOT)});"
                           " return b.length > 0 && b[b.length - 1].innerText.length > 40; }", timeout=60_000)
    page.locator("#stop").click()
    text = wait_stable(page, BOT, timeout_s=20)
    page.wait_for_timeout(1500)
    assert page.locator(BOT).last.inner_text() == text  # nothing arrives after Stop
    # the engine aborted the request: nothing runs on the worker
    status = httpx.get(platform.gateway.url + "/status", timeout=10).json()
    assert all(w["load"]["num_running"] == 0 for w in status["workers"]), status
    # the partial reply is stored, marked as aborted
    conv = only_conversation(db)
    rows = query(db, "SELECT role, finish_reason, completion_tokens FROM messages WHERE conversation_id = ? "
                     "ORDER BY position", conv)
    assert [r[0] for r in rows] == ["user", "assistant"] and rows[1][1] == "abort"
    set_slider(page, "max_tokens", 512)


def test_code_in_a_reply_is_rendered_as_highlighted_markdown(page):
    page.locator("#new_chat").click()
    page.wait_for_function(f"() => document.querySelectorAll({json.dumps(BOT)}).length === 0", timeout=10_000)
    set_slider(page, "max_tokens", 64)
    send(page, "Write a Python function that adds two numbers.")
    wait_count(page, BOT, 1)
    wait_stable(page, BOT)
    code = page.locator(f"{BOT} pre code.language-python").first
    code.wait_for(timeout=10_000)
    assert "def " in code.inner_text()
    assert page.locator(f"{BOT} pre code span.token.keyword").count() > 0  # highlighted, not plain text
    set_slider(page, "max_tokens", 512)


def test_reload_finds_the_chat_in_the_sidebar(page, ui):
    page.reload()
    page.wait_for_function("() => document.querySelector('#history') && "
                           "document.querySelector('#history').innerText.includes('capital of France')", timeout=30_000)
    assert page.locator(BOT).count() == 0  # a fresh page starts a new chat
    page.locator("#history").get_by_text("What is the capital of France?").click()
    wait_count(page, BOT, 2, timeout_ms=15_000)
    users = page.locator(USER).all_inner_texts()
    assert any("France" in u for u in users) and any("Italy" in u for u in users)
    assert page.locator("#title input").input_value() == "What is the capital of France?"


def test_rename_and_export_the_chat_as_json(page):
    page.locator("#title input").fill("Capitals")
    page.locator("#rename").click()
    page.wait_for_function("() => document.querySelector('#history').innerText.includes('Capitals')", timeout=10_000)
    page.locator("#export_json").click()
    link = page.locator("#export_file a[href]").first
    link.wait_for(timeout=15_000)
    body = page.request.get(link.get_attribute("href")).json()
    assert body["title"] == "Capitals"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant"]
    assert body["messages"][1]["completion_tokens"] > 0


def test_a_new_browser_user_does_not_see_the_chats(browser, ui):
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(ui.url)
        pg.wait_for_function("() => document.querySelector('#model input') && "
                             "document.querySelector('#model input').value !== ''", timeout=30_000)
        pg.wait_for_timeout(1000)
        assert "Capitals" not in pg.locator("#history").inner_text()
    finally:
        context.close()


def test_arena_battle_and_vote_move_the_leaderboard(page, platform, db):
    page.locator("#tab_arena-button, button[role=tab]:has-text('Arena')").first.click()
    send(page, "Name a fruit that is yellow.", box="#arena_input")
    wait_count(page, "#arena_a [data-testid='bot']", 1)
    wait_count(page, "#arena_b [data-testid='bot']", 1)
    wait_stable(page, "#arena_a [data-testid='bot']")
    wait_stable(page, "#arena_b [data-testid='bot']")
    assert "Model A" == page.locator("#arena_name_a").inner_text().strip()  # anonymous until the vote
    page.locator("#vote_a").click()
    page.wait_for_function("() => document.querySelector('#arena_result').innerText.includes('Vote recorded')",
                           timeout=10_000)
    revealed = {page.locator("#arena_name_a").inner_text(), page.locator("#arena_name_b").inner_text()}
    assert any(platform.model in t for t in revealed) and any(ARENA_MODEL in t for t in revealed)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "arena.png"))
    ((model_a, model_b, winner, anonymous),) = query(db, "SELECT model_a, model_b, winner, anonymous FROM battles")
    assert {model_a, model_b} == {platform.model, ARENA_MODEL} and winner == "model_a" and anonymous
    # a second vote in the same battle is refused
    page.locator("#vote_b").click()
    page.wait_for_function("() => document.querySelector('#arena_result').innerText.includes('already voted')",
                           timeout=10_000)
    assert len(query(db, "SELECT id FROM battles")) == 1
    page.locator("button[role=tab]:has-text('Leaderboard')").first.click()
    page.wait_for_function("() => document.querySelector('#lb_summary').innerText.includes('1 battles')",
                           timeout=15_000)
    table = page.locator("#leaderboard").inner_text()
    first_row = table.split(model_a)[0]
    assert model_a in table and model_b in table
    assert table.index(model_a) < table.index(model_b), first_row  # the winner ranks first
    page.locator("#winrate img, #winrate canvas, #winrate svg").first.wait_for(timeout=15_000)


def test_status_tab_lists_the_workers(page, platform):
    page.locator("button[role=tab]:has-text('Status')").first.click()
    page.wait_for_function("() => document.querySelector('#status_line').innerText.includes('2 worker')",
                           timeout=15_000)
    table = page.locator("#workers").inner_text()
    assert "worker-1" in table and ARENA_MODEL in table
    assert platform.worker.url.split("//")[1] not in table  # no internal address without --show-topology


def test_export_all_chats_as_sharegpt(db, tmp_path):
    out = tmp_path / "sharegpt.json"
    subprocess.run([sys.executable, "-m", "chatserve.cli.main", "export", "--format", "sharegpt", "--database",
                    str(db), "--output", str(out)], check=True, timeout=120)
    records = json.loads(out.read_text())
    assert records and all(set(r) >= {"id", "conversations"} for r in records)
    for r in records:
        roles = [t["from"] for t in r["conversations"]]
        assert roles[0] == "human" and roles[-1] == "gpt"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating turns
        assert all(isinstance(t["value"], str) and t["value"] for t in r["conversations"])
    capitals = [r for r in records if r["conversations"][0]["value"] == "What is the capital of France?"]
    assert capitals and [t["from"] for t in capitals[0]["conversations"]] == ["human", "gpt", "human", "gpt"]
    # stdout is the default
    text = subprocess.run([sys.executable, "-m", "chatserve.cli.main", "export", "--database", str(db)],
                          check=True, capture_output=True, text=True, timeout=120).stdout
    assert json.loads(text) == records


def test_the_ui_http_api_holds_a_chat(ui, platform):
    from gradio_client import Client

    client = Client(ui.url, verbose=False)
    first = client.predict("What is the capital of France?", "[]", platform.model, "", 0.0, 32, api_name="/chat")
    assert "Paris" in first
    history = json.dumps([{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": first}])
    second = client.predict("And of Germany?", history, platform.model, "", 0.0, 32, api_name="/chat")
    assert second and not second.startswith("⚠")
    assert client.predict("hi", "{not json", "", "", 0.0, 8, api_name="/chat").startswith("⚠ history_json")


def test_a_model_whose_worker_went_away_gives_a_readable_error(page, platform, arena_worker):
    page.locator("button[role=tab]:has-text('Chat')").first.click()
    page.locator("#new_chat").click()
    page.locator("#model input").click()
    page.get_by_role("option", name=ARENA_MODEL).click()
    page.wait_for_function(f"() => document.querySelector('#model input').value === '{ARENA_MODEL}'",
                           timeout=10_000)
    arena_worker.stop()  # deregisters: the gateway has no worker for the model the page still offers
    send(page, "Hello?")
    page.wait_for_function(f"() => {{ const b = document.querySelectorAll({json.dumps(BOT)});"
                           " return b.length > 0 && b[b.length - 1].innerText.includes('Error'); }", timeout=30_000)
    text = page.locator(BOT).last.inner_text()
    assert ARENA_MODEL in text or "worker" in text.lower(), text
    # the page is usable again at once: the other model still answers
    page.locator("#model input").click()
    page.get_by_role("option", name=platform.model).click()
    send(page, "What is the capital of France?")  # sending again replaces the error notice with the reply
    page.wait_for_function(f"() => {{ const b = document.querySelectorAll({json.dumps(BOT)});"
                           " return b.length > 0 && !b[b.length - 1].innerText.includes('Error'); }", timeout=60_000)
    assert "Paris" in wait_stable(page, BOT)


def login(browser, url: str, user: str, password: str):
    context = browser.new_context()
    pg = context.new_page()
    pg.goto(url)
    pg.locator("input[type=text], input[name=username]").first.fill(user)
    pg.locator("input[type=password]").first.fill(password)
    pg.locator("button:has-text('Login'), button[type=submit]").first.click()
    pg.wait_for_function("() => document.querySelector('#model input') && "
                         "document.querySelector('#model input').value !== ''", timeout=30_000)
    return context, pg


def test_login_separates_users_histories(browser, platform, request, tmp_path):
    users = tmp_path / "users.txt"
    from webui.auth import HASHER

    users.write_text(f"# chatserve users\nalice:{HASHER.hash('wonderland')}\nbob:{HASHER.hash('builder')}\n")
    db = tmp_path / "auth.sqlite3"
    ui = procs.webui(platform.api_url, "--database", str(db), "--auth-file", str(users)).start()
    request.node.services = [ui]
    try:
        ui.wait(path="/", ok=lambda r: r.status_code in (200, 401, 302), timeout=120)
        ctx, pg = login(browser, ui.url, "alice", "wonderland")
        send(pg, "Hello from Alice")
        wait_count(pg, BOT, 1)
        wait_stable(pg, BOT)
        pg.wait_for_function("() => document.querySelector('#history').innerText.includes('Hello from Alice')",
                             timeout=10_000)
        ctx.close()
        ctx, pg = login(browser, ui.url, "bob", "builder")
        pg.wait_for_timeout(1500)
        assert "Alice" not in pg.locator("#history").inner_text()
        ctx.close()
        assert query(db, "SELECT owner, title FROM conversations") == [("user:alice", "Hello from Alice")]
        # a wrong password does not get in
        r = httpx.post(ui.url + "/login", data={"username": "alice", "password": "nope"}, timeout=10)
        assert r.status_code in (400, 401)
        # one address trying many names is locked out for a while, even with a right password
        for name in ("carol", "dave", "erin", "frank"):
            httpx.post(ui.url + "/login", data={"username": name, "password": "guess"}, timeout=10)
        right = {"username": "alice", "password": "wonderland"}
        assert httpx.post(ui.url + "/login", data=right, timeout=10).status_code in (400, 401)
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:  # another address
            assert other.post(ui.url + "/login", data=right, timeout=10).status_code == 200
        time.sleep(1.5)
        assert httpx.post(ui.url + "/login", data=right, timeout=10).status_code == 200
    finally:
        ui.stop()


def test_a_reply_streaming_when_the_ui_is_killed_is_kept_as_interrupted(browser, platform, request, tmp_path):
    """SIGKILL mid-reply: the stored chat holds the user message and the reply as far as it had come
    (finish reason `interrupted`), whole rows only; nothing typed or received is lost."""
    db = tmp_path / "killed.sqlite3"
    ui = procs.webui(platform.api_url, "--database", str(db)).start()
    request.node.services = [ui]
    try:
        ui.wait(path="/", timeout=120)
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.goto(ui.url)
        pg.wait_for_function("() => document.querySelector('#model input') && "
                             "document.querySelector('#model input').value !== ''", timeout=30_000)
        send(pg, "Write a very long story about a dragon who learns to paint, in many chapters.")
        pg.wait_for_function(f"() => [...document.querySelectorAll({json.dumps(BOT)})].some(e => "
                             "e.innerText.length > 40)", timeout=60_000)
        pg.wait_for_timeout(1500)  # past the first checkpoint
        shown = pg.locator(BOT).last.inner_text()
        ui.kill()
        ctx.close()
    finally:
        ui.stop()
    rows = query(db, "SELECT role, content, finish_reason FROM messages ORDER BY position")
    assert [r[0] for r in rows] == ["user", "assistant"], rows
    assert rows[0][1].startswith("Write a very long story") and rows[1][2] == "interrupted"
    assert len(rows[1][1]) >= 40 and shown[:20].strip() in rows[1][1]

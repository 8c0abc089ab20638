"""Web UI parts without a browser: callbacks, storage (real SQLite files), migrations, ratings, export."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3

import numpy as np
import pytest

from webui import callbacks, export, ratings
from webui.app import read_auth_file
from webui.callbacks import Battle, ChatParams, Limits
from webui.client import GatewayClient, Reply
from webui.store import Base, Store, StoredMessage

U, A = "user", "assistant"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "ui.sqlite3"))
    yield s
    s.close()


# --- callbacks ---------------------------------------------------------------------------------------------


def test_add_user_message_limits_and_trailing_notices():
    text, h = callbacks.add_user_message("  hi  ", [], Limits())
    assert text == "" and h == [msg(U, "hi")]
    text, h = callbacks.add_user_message("x" * 11, [], Limits(max_message_chars=10))
    assert text == "x" * 11 and h[-1]["content"].startswith("⚠") and "limit is 10" in h[-1]["content"]
    # sending again clears the earlier notice
    _, h = callbacks.add_user_message("short", h, Limits(max_message_chars=10))
    assert h == [msg(U, "short")]
    full = [msg(U, "a"), msg(A, "b"), msg(U, "c"), msg(A, "d")]
    text, h = callbacks.add_user_message("e", full, Limits(max_turns=2))
    assert text == "e" and "2 turns" in h[-1]["content"] and len(h) == 5
    assert callbacks.add_user_message("   ", full, Limits()) == ("", full)


def test_notices_are_neither_sent_nor_stored_and_positions_skip_them():
    h = [msg(U, "a"), callbacks.notice("old turns dropped", "ℹ"), msg(A, "b"), msg(U, "c"),
         msg(A, "⚠ Error 503: no worker")]
    assert callbacks.to_api_messages(h, " sys ") == [msg("system", "sys"), msg(U, "a"), msg(A, "b"), msg(U, "c")]
    assert [callbacks.stored_position(h, i) for i in range(5)] == [0, None, 1, 2, None]
    # Gradio may hand content back as a list of parts
    assert callbacks.conversation_messages([{"role": U, "content": [{"type": "text", "text": "x"}]}]) == [msg(U, "x")]


def test_regenerate_and_edit_last():
    h = [msg(U, "a"), msg(A, "b"), msg(U, "c"), msg(A, "d"), callbacks.notice("x")]
    assert callbacks.regenerate_history(h) == h[:3]
    assert callbacks.edit_last(h) == ("c", h[:2])
    assert callbacks.edit_last([]) == ("", [])


def fake_counter(per_message: int, context: int):
    calls = []

    async def count(messages):
        calls.append(len(messages))
        return sum(per_message + len(m["content"]) for m in messages), context

    return count, calls


def test_fit_context_drops_oldest_turns_but_keeps_the_system_prompt():
    msgs = [msg("system", "S" * 10)] + [msg(U if i % 2 == 0 else A, "x" * 100) for i in range(9)]
    count, _ = fake_counter(10, 500)
    fit = asyncio.run(callbacks.fit_context(count, msgs, max_tokens=100))
    assert fit.messages[0]["role"] == "system" and fit.messages[1]["role"] == U
    assert fit.dropped_turns == 3 and len(fit.messages) == 1 + 3 and fit.max_tokens == 100
    # it fits as is: nothing dropped
    fit = asyncio.run(callbacks.fit_context(fake_counter(10, 10_000)[0], msgs, max_tokens=100))
    assert fit.dropped_turns == 0 and fit.messages == msgs


def test_fit_context_shrinks_the_reply_then_refuses():
    msgs = [msg(U, "x" * 150)]
    fit = asyncio.run(callbacks.fit_context(fake_counter(10, 200)[0], msgs, max_tokens=100))
    assert fit.max_tokens == 40 and fit.dropped_turns == 0
    with pytest.raises(callbacks.DoesNotFit, match="too long"):
        asyncio.run(callbacks.fit_context(fake_counter(10, 165)[0], msgs, max_tokens=100))


def test_respond_against_a_dead_gateway_shows_an_error_and_keeps_the_message(store):
    client = GatewayClient("http://127.0.0.1:9/v1")  # nothing listens on port 9

    async def run():
        out = []
        async for h, cid in callbacks.respond(client, store, "me", None, [msg(U, "hello")], ChatParams("m")):
            out.append((h, cid))
        return out

    out = asyncio.run(run())
    history, conv_id = out[-1]
    assert history[-1]["content"].startswith("⚠") and "connection" in history[-1]["content"].lower()
    conv = store.get_conversation(conv_id, "me")
    assert [(m.role, m.content) for m in conv.messages] == [(U, "hello")]  # the user's message is not lost


def test_no_model_selected_is_a_notice(store):
    async def run():
        return [h async for h, _ in callbacks.respond(GatewayClient("http://x/v1"), store, "me", None,
                                                       [msg(U, "hi")], ChatParams(""))]

    assert "No model selected" in asyncio.run(run())[-1][-1]["content"]


def test_pick_models():
    assert sorted(callbacks.pick_models(["a", "b", "c"], True, (None, None), random.Random(0))) != []
    pair = callbacks.pick_models(["a", "b"], True, (None, None), random.Random(1))
    assert sorted(pair) == ["a", "b"]
    with pytest.raises(ValueError, match="two models"):
        callbacks.pick_models(["a", "a"], True, (None, None))
    assert callbacks.pick_models(["a", "b"], False, ("b", "b")) == ["b", "b"]
    with pytest.raises(ValueError, match="Pick"):
        callbacks.pick_models(["a", "b"], False, ("a", None))
    with pytest.raises(ValueError, match="no longer served"):
        callbacks.pick_models(["a", "b"], False, ("a", "z"))


def test_arena_vote_rules(store):
    battle = Battle(models=["a", "b"])
    assert "first" in callbacks.arena_vote(store, "me", battle, [[msg(U, "q")], [msg(U, "q")]], "a")
    hs = [[msg(U, "q"), msg(A, "x")], [msg(U, "q"), msg(A, "y")]]
    assert "model_b" in callbacks.arena_vote(store, "me", battle, hs, "b") and battle.voted
    assert "already voted" in callbacks.arena_vote(store, "me", battle, hs, "a")
    assert store.battles() == [("a", "b", "model_b")]


def test_status_rows():
    st = {"workers": [{"worker_id": "w1", "address": "http://h:1", "models": ["m"], "last_heartbeat_age_s": 0.42,
                       "load": {"queue_length": 3, "num_running": 2, "num_waiting": 1, "kv_cache_usage": 0.25,
                                "kv_capacity_tokens": 16384, "tokens_per_second": 51.26, "prefix_cache_hit_rate": 0.5}}]}
    assert callbacks.status_rows(st) == [["w1", "http://h:1", "m", 3, 2, 1, "25.0%", 16384, 51.3, "50%", 0.4]]


def test_auth_file_holds_hashes_and_refuses_plaintext(tmp_path):
    from webui.auth import HASHER

    f = tmp_path / "users"
    h = HASHER.hash("s3cret:with:colons")
    f.write_text(f"# team\nalice:{h}\n\n")
    assert read_auth_file(str(f)) == {"alice": h}
    f.write_text("carol\n")
    with pytest.raises(SystemExit, match=":1: expected USER:HASH"):
        read_auth_file(str(f))
    f.write_text("bob:builder\n")
    with pytest.raises(SystemExit, match="plain text.*chatserve webui add-user bob"):
        read_auth_file(str(f))


def test_repeated_failures_lock_a_user_out_for_a_while():
    from webui.auth import HASHER, Logins

    now = [0.0]
    logins = Logins({"alice": HASHER.hash("wonderland")}, clock=lambda: now[0])
    assert logins("alice", "wonderland")
    for _ in range(5):
        assert not logins("alice", "guess")
    assert not logins("alice", "wonderland")  # locked: even the right password is refused
    now[0] += 1.5
    assert logins("alice", "wonderland")  # the lock ran out
    assert not logins("nobody", "x")


def test_an_address_guessing_many_names_is_locked_out_too():
    from webui.auth import CLIENT, HASHER, Logins

    now = [0.0]
    logins = Logins({"alice": HASHER.hash("wonderland")}, clock=lambda: now[0])
    token = CLIENT.set("203.0.113.7")
    try:
        for name in ("a", "b", "c", "d", "e"):  # one failure per name: no user is locked, the address is
            assert not logins(name, "guess")
        assert not logins("alice", "wonderland")
    finally:
        CLIENT.reset(token)
    CLIENT.set("198.51.100.2")
    assert logins("alice", "wonderland")  # from elsewhere the user still gets in


def test_add_user_stores_a_hash_read_from_stdin(tmp_path):
    import subprocess
    import sys

    from webui.auth import HASHER

    f = tmp_path / "users"
    f.write_text("bob:" + HASHER.hash("builder-pw") + "\n")
    for pw in ("first-password", "second-password"):  # the second replaces the first
        out = subprocess.run([sys.executable, "-m", "chatserve.cli.main", "webui", "add-user", "alice", "--auth-file",
                              str(f)], input=pw + "\n", capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    users = read_auth_file(str(f))
    assert set(users) == {"alice", "bob"} and "second-password" not in f.read_text()
    assert HASHER.verify(users["alice"], "second-password")


def test_database_urls_are_logged_without_their_password():
    from webui.app import masked_url

    assert masked_url("postgresql+psycopg://chat:hunter2@db/chatserve") == "postgresql+psycopg://chat:***@db/chatserve"
    assert "hunter2" not in masked_url("postgresql://u:hunter2@h:5432/x")


# --- storage -----------------------------------------------------------------------------------------------


def test_migrations_build_exactly_the_models_schema(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == "0001"
        assert compare_metadata(ctx, Base.metadata) == []
    Store(store.url).close()  # upgrading again is a no-op


def test_persist_load_and_owners(store):
    p = ChatParams("m", "be brief", 0.2, 0.9, 64)
    h = [msg(U, "first question"), msg(A, "answer")]
    reply = Reply(text="answer", ttft_s=0.1, duration_s=0.5, prompt_tokens=12, completion_tokens=3,
                  finish_reason="stop")
    cid = callbacks.persist(store, "alice", None, h, p, reply)
    assert callbacks.sidebar_choices(store, "alice") == [("first question", cid)]
    assert callbacks.sidebar_choices(store, "bob") == []  # another user's sidebar is empty
    history, got, params = callbacks.load_chat(store, "alice", cid)
    assert history == h and got == cid and params == p
    assert callbacks.load_chat(store, "bob", cid) == ([], None, None)  # and they cannot open it
    assert not store.delete_conversation(cid, "bob")
    conv = store.get_conversation(cid)
    assert (conv.messages[1].ttft_s, conv.messages[1].completion_tokens, conv.messages[1].finish_reason) == \
        (0.1, 3, "stop")


def test_votes_follow_their_reply(store):
    cid = store.create_conversation("me")
    store.replace_messages(cid, "me", [StoredMessage(U, "q"), StoredMessage(A, "a1")])
    assert store.vote(cid, 1, "me", "upvote") and store.vote(cid, 1, "me", "flag")
    assert store.vote(cid, 1, "me", "downvote")  # replaces the upvote
    assert sorted(store.votes(cid)) == [(1, "downvote"), (1, "flag")]
    assert not store.vote(cid, 0, "me", "upvote")  # user messages are not voted on
    assert not store.vote(cid, 1, "eve", "upvote")  # nor other people's chats
    with pytest.raises(ValueError):
        store.vote(cid, 1, "me", "love")
    # unchanged prefix keeps its rows; a regenerated reply is a new row without the old votes
    ids = store.replace_messages(cid, "me", [StoredMessage(U, "q"), StoredMessage(A, "a2")])
    assert len(ids) == 2 and store.votes(cid) == []


def test_store_rename_delete_cascade(store, tmp_path):
    cid = store.create_conversation("me", title="t")
    store.replace_messages(cid, "me", [StoredMessage(U, "q"), StoredMessage(A, "a")])
    store.vote(cid, 1, "me", "upvote")
    assert store.update_conversation(cid, "me", title="renamed" * 40)
    assert store.list_conversations("me")[0][1] == ("renamed" * 40)[:200]
    with pytest.raises(ValueError):
        store.update_conversation(cid, "me", mode="arena")
    assert store.delete_conversation(cid, "me")
    with sqlite3.connect(tmp_path / "ui.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM votes").fetchone() == (0,)


# --- ratings -----------------------------------------------------------------------------------------------


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(0)
    true = {"a": 1200.0, "b": 1000.0, "c": 900.0}
    battles = []
    for _ in range(3000):
        x, y = rng.choice(list(true), 2, replace=False)
        p = 1 / (1 + 10 ** ((true[y] - true[x]) / 400))
        battles.append((x, y, "model_a" if rng.random() < p else "model_b"))
    bt = ratings.bradley_terry(battles)
    mean = np.mean(list(true.values()))
    for m in true:
        assert abs(bt[m] - (true[m] - mean + 1000)) < 25, (m, bt[m])
    ci = ratings.bootstrap_ci(battles, rounds=30)
    assert all(ci[m][0] <= bt[m] <= ci[m][1] for m in true)
    assert ci["a"][0] > ci["b"][1]  # well separated models have disjoint intervals


def test_elo_ties_and_undefeated():
    elo = ratings.online_elo([("a", "b", "model_a")])
    assert elo["a"] == pytest.approx(1002) and elo["b"] == pytest.approx(998)
    assert ratings.online_elo([("a", "b", "tie")]) == {"a": 1000.0, "b": 1000.0}
    bt = ratings.bradley_terry([("a", "b", "model_a")] * 5)  # finite although a never lost
    assert np.isfinite(list(bt.values())).all() and bt["a"] > bt["b"]
    rows = ratings.leaderboard([("a", "b", "model_a"), ("b", "c", "tie (bothbad)")], rounds=10)
    assert [r.model for r in rows][0] == "a" and {r.model: r.battles for r in rows} == {"a": 1, "b": 2, "c": 1}
    models, m = ratings.win_matrix([("a", "b", "model_a"), ("a", "b", "tie")])
    assert models == ["a", "b"] and m[0, 1] == 0.75 and m[1, 0] == 0.25 and np.isnan(m[0, 0])
    assert ratings.leaderboard([]) == []


# --- export ------------------------------------------------------------------------------------------------


def test_sharegpt_markdown_and_json(store):
    full = store.create_conversation("me", title="Capitals", model="m", system_prompt="be brief")
    store.replace_messages(full, "me", [StoredMessage(U, "q1"), StoredMessage(A, "a1"), StoredMessage(U, "q2")])
    empty = store.create_conversation("me")
    assert empty
    records = export.sharegpt(store)
    assert records == [{"id": full, "model": "m", "system": "be brief",
                        "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}]
    conv = store.get_conversation(full)
    md = export.to_markdown(conv)
    assert md.startswith("# Capitals") and "## System\n\nbe brief" in md and "## User\n\nq2" in md
    body = json.loads(json.dumps(export.to_json(conv)))
    assert [m["role"] for m in body["messages"]] == [U, A, U] and body["system_prompt"] == "be brief"


def test_replies_show_image_links_instead_of_loading_images():
    from webui.callbacks import no_remote_images

    leak = "Done! ![x](https://evil.example/p.png?chat=secret) and ![][ref] <img src=https://evil.example/q>"
    shown = no_remote_images(leak)
    assert "![" not in shown and "<img" not in shown.lower()
    assert "[image: x](https://evil.example/p.png?chat=secret)" in shown  # the link stays, as a link
    assert no_remote_images("a [link](https://x.org) and `code`") == "a [link](https://x.org) and `code`"

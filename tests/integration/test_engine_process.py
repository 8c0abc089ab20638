"""A worker whose engine runs in a process of its own (`--engine-process on`; the default with a GPU), on the CPU:
the same answers as the in-process engine, streaming, embeddings, aborts, and an engine process that dies
taken as a failed worker, never a hang."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def proc_platform(request) -> Iterator[dict[str, procs.Service]]:
    yield from procs.own_stack(request, "--engine-process", "on", "--dtype", "float32")


def test_engine_process_setting_is_checked():
    from chatserve.settings import WorkerSettings
    from worker.app import use_engine_process
    from worker.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="auto, on or off"):
        use_engine_process(WorkerSettings(engine_process="maybe"))
    assert use_engine_process(WorkerSettings(engine_process="auto", device="cpu")) is False
    assert use_engine_process(WorkerSettings(engine_process="on", tensor_parallel=2)) is False  # rank 0 spawns


def client(g: procs.Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url + "/v1", api_key="none", max_retries=0)


def test_engine_runs_in_its_own_process(proc_platform):
    w = proc_platform["worker"]
    pid = httpx.get(w.url + "/status").json()["engine_pid"]
    assert pid and pid != w.proc.pid
    with open(f"/proc/{pid}/status") as f:
        assert f"PPid:\t{w.proc.pid}" in f.read()  # a child of the worker


def test_answers_equal_the_in_process_engine(proc_platform, platform):
    # both float32 greedy: the session platform runs the engine on a thread of the worker's process
    ours, theirs = client(proc_platform["gateway"]), openai.OpenAI(base_url=platform.api_url, api_key="none")
    a = ours.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    b = theirs.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert "Paris" in a.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    stream = ours.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens
    # the second time the prompt's blocks come from the prefix cache, in the engine's process
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_embeddings_and_refusals(proc_platform):
    c = client(proc_platform["gateway"])
    e = c.embeddings.create(model=MODEL, input=["hello", "hello world"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 576
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 3000}], max_tokens=5)
    assert "maximum context length" in str(exc.value)


def test_client_disconnect_aborts_in_the_engine_process(proc_platform):
    g, w = proc_platform["gateway"], proc_platform["worker"]
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", g.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines, running = [], 0
        for line in r.iter_lines():  # a client reading its tokens, until the engine's load report shows them
            lines.append(line)
            assert "error" not in line and "finish_reason\":\"" not in line, lines  # still generating
            if line.startswith("data: ") and len(lines) > 4:
                running = httpx.get(w.url + "/status").json()["load"]["num_running"]
                if running == 1 or len(lines) > 400:
                    break
        assert running == 1, lines[-6:]
    deadline = time.monotonic() + 10
    while httpx.get(w.url + "/status").json()["load"]["num_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(w.url + "/status").json()["load"]["num_running"] == 0


def test_dead_engine_process_fails_the_worker_not_the_caller(proc_platform):
    g, w = proc_platform["gateway"], proc_platform["worker"]
    c = client(g)
    stream = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1500, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # generating
    os.kill(httpx.get(w.url + "/status").json()["engine_pid"], signal.SIGKILL)
    with pytest.raises(openai.APIError):  # the open stream ends with an error event, not a hang
        for _ in stream:
            pass
    deadline = time.monotonic() + 10
    while httpx.get(w.url + "/health").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    health = httpx.get(w.url + "/health")
    assert health.status_code == 503 and "engine process exited" in health.json()["error"]
    with pytest.raises(openai.APIStatusError) as exc:  # no other worker serves the model
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5)
    assert exc.value.status_code == 503 and MODEL in exc.value.message
    assert w.proc.poll() is None  # the worker itself stays up, reporting the failure

"""Scoring and prefill through the real openai SDK against the embedded model (fp32 worker): the calls
lm-evaluation-harness's `local-completions` makes (echo + logprobs + max_tokens 1, or 0), checked against a
transformers forward of the same GGUF; vLLM's prompt_logprobs on completions and chat; assistant prefill
(continue_final_message, echo) and the bad inputs of each."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

pytestmark = pytest.mark.integration

TEXT = "The capital of France is Paris. The capital of Italy is Rome."


@pytest.fixture(scope="module")
def client(platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """transformers' own model of the embedded GGUF (fp32), its tokenizer, and a prompt's logprobs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.loader import EMBEDDED_FILE, embedded_model_path

    folder = embedded_model_path().parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_FILE)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_FILE, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> list[float]:
        with torch.no_grad():
            lp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()

    return tok, logprobs


def test_lm_eval_loglikelihood_request_scores_every_prompt_token_like_transformers(client, platform, reference):
    tok, logprobs = reference
    ids = tok(TEXT)["input_ids"]
    r = client.completions.create(model=platform.model, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = logprobs(ids)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:len(ids)], want)) < 1e-3
    # lm-eval's is_greedy: the top alternative at each position
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert r.choices[0].text.startswith(tok.decode(ids))


def test_max_tokens_zero_scores_the_prompt_alone(client, platform, reference):
    tok, logprobs = reference
    ids = tok(TEXT)["input_ids"]
    r = client.completions.create(model=platform.model, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and r.usage.completion_tokens == 0
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], logprobs(ids))) < 1e-3
    # logprobs 0: the chosen token's entry at every position
    assert all(t == {tok_: v} for t, tok_, v in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:]))
    assert r.choices[0].text == tok.decode(ids)


def test_prompt_logprobs_give_the_same_numbers_on_completions_and_chat(client, platform, reference):
    tok, logprobs = reference
    ids = tok(TEXT)["input_ids"]
    r = client.completions.create(model=platform.model, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2})
    pl = r.choices[0].model_extra["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    chosen = [entry[str(t)]["logprob"] for entry, t in zip(pl[1:], ids[1:])]
    assert max(abs(a - b) for a, b in zip(chosen, logprobs(ids))) < 1e-3
    assert all(len(e) >= 2 and any(v["rank"] == 1 for v in e.values()) for e in pl[1:])

    msgs = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model=platform.model, messages=msgs, max_tokens=1,
                                          extra_body={"prompt_logprobs": 1})
    rendered = httpx.post(platform.gateway.url + "/tokenize", json={"model": platform.model, "messages": msgs},
                          timeout=30).json()["tokens"]
    cpl = chat.model_extra["prompt_logprobs"]
    assert len(cpl) == len(rendered) == chat.usage.prompt_tokens
    got = [e[str(t)]["logprob"] for e, t in zip(cpl[1:], rendered[1:])]
    assert max(abs(a - b) for a, b in zip(got, logprobs(rendered))) < 1e-3


def test_a_streamed_echo_sends_the_prompt_entries_first(client, platform, reference):
    tok, _ = reference
    ids = tok(TEXT)["input_ids"]
    chunks = list(client.completions.create(model=platform.model, prompt=ids, echo=True, logprobs=1, max_tokens=3,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == tok.decode(ids) and len(first.logprobs.tokens) == len(ids)
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert offsets == sorted(offsets) and len(offsets) == len(ids) + 3


def test_prefill_continues_the_final_assistant_message(client, platform):
    prefix = "The capital of France is"
    msgs = [{"role": "user", "content": "Complete the sentence."}, {"role": "assistant", "content": prefix}]
    r = client.chat.completions.create(model=platform.model, messages=msgs, max_tokens=8, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                   "echo": True, "prompt_logprobs": 0})
    assert r.choices[0].message.content.startswith(prefix)
    # the prompt ends inside the assistant's message: no end-of-turn after it, no new assistant header
    prompt_tokens = [next(iter(e.values()))["decoded_token"] for e in r.model_extra["prompt_logprobs"][1:]]
    assert "".join(prompt_tokens).endswith(prefix)
    closed = client.chat.completions.create(model=platform.model, messages=msgs, max_tokens=1)
    assert closed.usage.prompt_tokens > r.usage.prompt_tokens  # the end of turn and a new header
    streamed = list(client.chat.completions.create(
        model=platform.model, messages=msgs, max_tokens=8, temperature=0, stream=True,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True}))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == r.choices[0].message.content


def test_chat_template_kwargs_reach_the_template(client, platform):
    r = client.chat.completions.create(model=platform.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("/completions", {"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ("/completions", {"prompt": "Hi", "echo": True, "logprobs": 6}, "logprobs"),
    ("/completions", {"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "continue_final_message": True,
                           "add_generation_prompt": False}, None),
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
                           "continue_final_message": True}, None),
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                           "chat_template_kwargs": {"add_generation_prompt": False}}, None),
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_bad_scoring_and_prefill_inputs_get_a_400(platform, path, body, param):
    r = httpx.post(platform.api_url + path, json={"model": platform.model, **body}, timeout=60)
    assert r.status_code == 400, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param

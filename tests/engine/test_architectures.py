"""The LLaMA-derived architectures served by the one model (worker/engine/model.py's table): Mistral, Qwen 2
(q/k/v biases), Qwen 3 (per-head q/k norms, a head_dim of its own), Phi-3 (checkpoints with q/k/v and gate/up
already fused). Tiny random configs of each against transformers' own `generate`, token for token: one
request, mixed arrivals with prefix-cache hits, preemption; loaded from a saved folder by the worker's
loader; and what is still refused, refused at load with its reason."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.engine.conftest import engine_for, hf_greedy, run, save_tiny_tokenizer
from worker.engine.model import LlamaConfig
from worker.loader import ModelLoadError, load_model

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _build(kind: str, seed: int = 0, **overrides):
    import transformers as tf

    classes = {"mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False, "head_dim": 32}),
               "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "original_max_position_embeddings": 512})}
    config_name, model_name, extra = classes[kind]
    torch.manual_seed(seed)
    cfg = getattr(tf, config_name)(**{**BASE, **extra, **overrides})
    model = getattr(tf, model_name)(cfg).float().eval()
    if kind == "qwen2":  # random biases, so a model that dropped them would differ
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    if kind == "qwen3":  # norm weights away from 1, so a model that skipped them would differ
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


KINDS = ["mistral", "qwen2", "qwen3", "phi3"]


@pytest.fixture(scope="module", params=KINDS)
def arch_model(request):
    return request.param, _build(request.param)


def _prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_switches_come_from_the_config(arch_model):
    kind, hf = arch_model
    cfg = LlamaConfig.from_hf(hf.config)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.qk_norm == (kind == "qwen3")
    assert cfg.head_dim == (32 if kind == "qwen3" else 16)


def test_single_and_mixed_requests_with_prefix_hits_match_transformers(arch_model):
    _, hf = arch_model
    ps = _prompts(1, 4, 8, 40)
    engine = engine_for(hf, budget=32)
    out = run(engine, {0: [("a", ps[0], 12)], 2: [("b", ps[1], 10), ("c", ps[2], 8)], 5: [("d", ps[0] + ps[3], 9)]})
    for rid, p, n in (("a", ps[0], 12), ("b", ps[1], 10), ("c", ps[2], 8), ("d", ps[0] + ps[3], 9)):
        assert out[rid] == hf_greedy(hf, p, n), rid
    assert engine.blocks.hit_tokens > 0  # "d" began with "a"'s prompt


def test_preempted_requests_match_transformers(arch_model):
    _, hf = arch_model
    ps = _prompts(2, 4, 10, 24)
    engine = engine_for(hf, num_blocks=20, block_size=4)
    engine.scheduler.growth_cap = 0
    out = run(engine, {0: [(f"r{i}", p, 20) for i, p in enumerate(ps)]})
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == hf_greedy(hf, p, 20), i


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_folder_of_each_architecture_loads_and_matches(tmp_path, kind):
    hf = _build(kind, seed=3)
    hf.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=256)
    from worker.engine.engine import LLMEngine
    from worker.engine.model_runner import CacheConfig, ModelRunner

    runner = ModelRunner(loaded.model, CacheConfig(block_size=4, num_blocks=256), 4, 256)
    engine = LLMEngine(runner, loaded.tokenizer, max_num_seqs=4, max_batched_tokens=64)
    p = _prompts(4, 1, 20, 20)[0]
    assert run(engine, {0: [("x", p, 10)]})["x"] == hf_greedy(hf, p, 10)


def test_a_sliding_window_shorter_than_the_context_is_refused_with_the_fix(tmp_path):
    _build("mistral", sliding_window=64).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(ModelLoadError, match="sliding window of 64 tokens.*--context-length 64"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=256)
    loaded = load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=64)  # inside it: exact
    assert loaded.context_length == 64


def test_quantizing_a_model_with_biases_is_refused_at_load(tmp_path):
    _build("qwen2").save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(ModelLoadError, match="--quantize is not served yet.*q/k/v biases"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=128, quantize="int8")


def test_an_architecture_outside_the_table_is_refused_naming_those_served(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="GemmaForCausalLM.*Qwen3ForCausalLM, Phi3ForCausalLM"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=128)


def _hub_cache(root, repo_id: str, kind: str):
    """A cache folder laid out as huggingface_hub lays one out: models--org--name/{refs/main, snapshots/REV/}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    hf = _build(kind, seed=6)
    hf.save_pretrained(snap)
    save_tiny_tokenizer(snap)
    return hf


def test_a_hub_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    hf = _hub_cache(tmp_path, "acme/tiny-qwen3", "qwen3")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # nothing may be fetched
    loaded = load_model("acme/tiny-qwen3", device="cpu", dtype=torch.float32, context_length=128)
    assert loaded.name == "acme/tiny-qwen3"
    from worker.engine.engine import LLMEngine
    from worker.engine.model_runner import CacheConfig, ModelRunner

    engine = LLMEngine(ModelRunner(loaded.model, CacheConfig(block_size=4, num_blocks=128), 4, 128), loaded.tokenizer)
    p = _prompts(8, 1, 12, 12)[0]
    assert run(engine, {0: [("x", p, 8)]})["x"] == hf_greedy(hf, p, 8)
    with pytest.raises(ModelLoadError, match="acme/absent.*not in the Hugging Face cache"):
        load_model("acme/absent", device="cpu", dtype=torch.float32, context_length=128)


ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
                    "mscale": 1.0, "mscale_all_dim": 0.5},
}


@pytest.mark.parametrize("name", list(ROPE))
def test_rope_scalings_match_transformers_past_the_original_context(name):
    from tests.engine.conftest import tiny_hf

    from chatserve.protocol.sampling import SamplingParams

    hf = tiny_hf(seed=9, max_position_embeddings=256, rope_parameters={"rope_theta": 10000.0, **ROPE[name]})
    p = _prompts(10, 1, 150, 150)[0]  # past the original 64 positions (and linear's 256 / 4)
    engine = engine_for(hf, budget=64)
    assert run(engine, {0: [("x", p, 12)]})["x"] == hf_greedy(hf, p, 12)
    # and every position's logprob (greedy tokens alone would miss a scale on the attention scores)
    engine.add_request("s", p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    got = None
    while engine.has_unfinished():
        got = next((o.prompt_logprobs for o in engine.step() if o.prompt_logprobs), got)
    with torch.no_grad():
        want = hf(torch.tensor([p])).logits[0, :-1].log_softmax(-1).gather(1, torch.tensor(p[1:])[:, None])[:, 0]
    assert max(abs(e[1] - w) for e, w in zip(got[1:], want.tolist())) < 1e-3


def test_an_unsupported_rope_scaling_is_refused_at_load(tmp_path):
    _build("phi3", rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                    "long_factor": [2.0] * 8, "original_max_position_embeddings": 256},
           max_position_embeddings=1024).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(ModelLoadError, match="longrope"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=512)

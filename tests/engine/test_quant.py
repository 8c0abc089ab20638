"""Weight-only int8 / int4 quantization on CPU: kernels against a dequantized reference, and the
embedded model's perplexity on a fixed text against bf16 (the issue's bounds: 2% for int8, 10% for int4)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from chatserve.protocol.sampling import SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import CacheConfig, ModelRunner
from worker.engine.quant import QuantLinear, quantize_int4, quantize_int8, quantize_model, weight_bytes
from worker.loader import embedded_model_path, gguf_is_4bit, load_model

TEXT = (Path(__file__).resolve().parents[2] / "chatserve" / "conversation" / "templates.py").read_text()[:5000]


def test_int8_kernel_matches_its_dequantized_weights():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    q = QuantLinear(lin, "int8")
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    w, s = quantize_int8(lin.weight)
    ref = x.float() @ (w.float() * s.float()[:, None]).T
    assert torch.allclose(q(x).float(), ref, atol=0.05, rtol=0.02)
    assert q.weight.dtype == torch.int8 and q.weight.numel() == 256 * 96


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_matches_its_dequantized_weights(group):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    q = QuantLinear(lin, "int4", group)
    assert q.group == group
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    vals, sz = quantize_int4(lin.weight, group)
    scales, zeros = sz[..., 0].T, sz[..., 1].T  # [N, K/group]
    deq = ((vals.float().reshape(64, -1, group) - 8) * scales[..., None] + zeros[..., None]).reshape(64, 256)
    assert torch.allclose(q(x).float(), x.float() @ deq.T, atol=0.05, rtol=0.02)
    # and the quantized weights are close to the originals
    assert (deq - lin.weight.float()).abs().mean() < 0.12 * lin.weight.float().abs().mean()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="int8, int4"):
        QuantLinear(nn.Linear(64, 64, bias=False), "int3")


@pytest.fixture(scope="module")
def base():
    return load_model(None, device="cpu", dtype=torch.bfloat16, context_length=None)


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model.logits(model.dense_hidden(ids))[0, :-1]
        return math.exp(nn.functional.cross_entropy(logits, ids[0, 1:]).item())


def test_quantized_embedded_model_keeps_its_perplexity(base):
    ids = torch.tensor([base.tokenizer(TEXT).input_ids[:768]])
    ref = perplexity(base.model, ids)
    assert gguf_is_4bit(embedded_model_path())  # so the loader quantizes int4 in groups of 32
    results = {}
    for mode, bound in (("int8", 0.02), ("int4", 0.10)):
        model = copy.deepcopy(base.model)
        quantize_model(model, mode, group_size=32)
        results[mode] = (perplexity(model, ids), weight_bytes(model))
        assert abs(results[mode][0] / ref - 1) <= bound, (mode, results[mode][0], ref)
    size = weight_bytes(base.model)
    assert results["int8"][1] < 0.65 * size and results["int4"][1] < results["int8"][1]


def test_engine_serves_a_quantized_model(base):
    model = copy.deepcopy(base.model)
    quantize_model(model, "int8")
    engine = LLMEngine(ModelRunner(model, CacheConfig(cpu_cache_tokens=2048), 4, 2048), base.tokenizer)
    text = base.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True, tokenize=False)
    prompt = base.tokenizer(text, add_special_tokens=False).input_ids
    engine.add_request("q", prompt, SamplingParams(max_tokens=12, temperature=0))
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            text += out.text
    assert "Paris" in text

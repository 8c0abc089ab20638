"""GPU quantization (opt-in, device tool): the Triton int8 kernel and tinygemm int4 against dequantized
references, and quantized models through the engine with CUDA graphs: graph replays equal eager steps, and
greedy output agrees with transformers running the same (dequantized) weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.engine.conftest import IdTokenizer, run, tiny_hf
from worker.engine.engine import LLMEngine
from worker.engine.model import LlamaConfig, LlamaModel
from worker.engine.model_runner import CacheConfig, ModelRunner
from worker.engine.quant import QuantLinear, quantize_int4, quantize_int8, quantize_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MID = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=2048)


@pytest.mark.parametrize("m", [1, 3, 16, 33, 64, 200])
def test_int8_triton_kernel_matches_reference(m):
    torch.manual_seed(m)
    lin = nn.Linear(4096, 11008, bias=False, device="cuda", dtype=torch.bfloat16)
    q = QuantLinear(lin, "int8")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w, s = quantize_int8(lin.weight)
    ref = x.float() @ (w.float() * s.float()[:, None]).T
    err = (q(x).float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, float(err)


@pytest.mark.parametrize("m", [1, 8, 100])
def test_int4_tinygemm_matches_reference(m):
    torch.manual_seed(m)
    lin = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    q = QuantLinear(lin, "int4", 128)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    vals, sz = quantize_int4(lin.weight, 128)
    deq = ((vals.float().reshape(4096, -1, 128) - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).reshape(4096, 4096)
    ref = x.float() @ deq.T
    err = (q(x).float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, float(err)


def quantized_engine(hf, mode: str, graphs: bool) -> LLMEngine:
    cfg = LlamaConfig.from_hf(hf.config)
    with torch.device("cuda"):
        model = LlamaModel(cfg).to(torch.bfloat16)
    model.load_hf_state_dict({k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()})
    quantize_model(model, mode)
    runner = ModelRunner(model, CacheConfig(block_size=16, num_blocks=512), 16, 2048, use_cuda_graphs=graphs)
    return LLMEngine(runner, IdTokenizer(), max_num_seqs=16, max_batched_tokens=512)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_graphs_equal_eager(mode):
    hf = tiny_hf(seed=5, **MID).cuda()
    prompts = [[(7 * i + 13 * j) % 31000 + 3 for j in range(20 + 9 * i)] for i in range(6)]
    outs = []
    for graphs in (True, False):
        engine = quantized_engine(hf, mode, graphs)
        assert bool(engine.runner.graphs) == graphs
        outs.append(run(engine, {0: [(f"r{i}", p, 24) for i, p in enumerate(prompts)]}))
    assert outs[0] == outs[1]
    assert all(len(v) == 24 for v in outs[0].values())

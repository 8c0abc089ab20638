"""GPU correctness (opt-in: needs CUDA; run through the device tool). Triton paged decode, CUDA graphs,
chunked prefill, prefix-cache hits and preemption, all against transformers' `generate`."""

from __future__ import annotations

import random

import pytest
import torch

from tests.engine.conftest import engine_for, greedy, hf_greedy, run, tiny_hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MID = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def hf_gpu():
    return tiny_hf(seed=3, **MID).cuda()


def prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_gpu_engine_matches_transformers_fp32_mixed_arrivals(hf_gpu):
    ps = prompts(1, 8, 5, 300)
    engine = engine_for(hf_gpu, block_size=16, budget=256, max_num_seqs=16)
    assert engine.runner.graphs, "decode CUDA graphs were captured"
    arrivals = {0: [(f"r{i}", p, 20) for i, p in enumerate(ps[:3])], 4: [(f"r{i}", p, 20) for i, p in enumerate(ps[3:], 3)]}
    out = run(engine, arrivals)
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == hf_greedy(hf_gpu, p, 20), i


def test_gpu_prefix_cache_and_preemption_match(hf_gpu):
    engine = engine_for(hf_gpu, num_blocks=40, block_size=16, budget=512, max_num_seqs=16)
    engine.scheduler.growth_cap = 0  # admit on prompt blocks alone, so running sequences get preempted
    ps = prompts(2, 6, 60, 150)
    finished: list[str] = []
    out = run(engine, {0: [(f"r{i}", p, 40) for i, p in enumerate(ps)]}, finished)
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == hf_greedy(hf_gpu, p, 40), i
    # the next turn of the conversation that finished last: the cache is smaller than all six, so the blocks
    # of those that finished first were evicted (LRU) for the others
    last = finished[-1]
    turn2 = ps[int(last[1:])] + out[last] + prompts(3, 1, 10, 10)[0]
    engine.add_request("t2", turn2, greedy(16))
    toks, cached = [], 0
    while engine.has_unfinished():
        for o in engine.step():
            toks.extend(o.token_ids)
            cached = o.cached_tokens
    assert cached >= 16
    assert toks == hf_greedy(hf_gpu, turn2, 16)


def test_gpu_embeddings_equal_transformers_mean_pooling(hf_gpu):
    engine = engine_for(hf_gpu, block_size=16, budget=256)
    inputs = prompts(4, 5, 3, 200)
    for ids, vec in zip(inputs, engine.embed(inputs)):
        with torch.no_grad():
            hidden = hf_gpu.model(torch.tensor([ids], device="cuda")).last_hidden_state[0]
        ref = torch.nn.functional.normalize(hidden.mean(0), dim=-1).cpu()
        torch.testing.assert_close(vec, ref, atol=2e-4, rtol=2e-4)


def test_gpu_constrained_json_runs_ahead_and_leaves_neighbours_untouched():
    """Constrained decoding on the device in its running-ahead mode (masks computed after the step is
    queued, applied on the device): sampled JSON follows the schema, unconstrained neighbours match a run
    without it."""
    import json

    import jsonschema

    from chatserve.protocol.sampling import SamplingParams
    from chatserve.tools.grammar import json_schema_grammar
    from tests.engine.conftest import byte_bpe_tokenizer, prompts_for
    from tests.engine.test_guided import SCHEMA, make_engine, texts

    hf, tok = tiny_hf(seed=5).cuda(), byte_bpe_tokenizer()
    ps = prompts_for(16, seed=3)
    free = [(f"f{i}", p, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)) for i, p in enumerate(ps[:8])]
    alone = texts(make_engine(hf, tok, overlap=True), free)
    guided = [(f"j{i}", p, SamplingParams(max_tokens=200, temperature=1.0, seed=i, grammar=json_schema_grammar(SCHEMA)))
              for i, p in enumerate(ps[8:])]
    engine = make_engine(hf, tok, overlap=True)
    assert engine.runner.graphs and engine.overlap
    mixed = texts(engine, free + guided)
    for rid, _, _ in free:
        assert mixed[rid] == alone[rid]
    for rid, _, _ in guided:
        text, reason = mixed[rid]
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_decode_kernel_one_pass_and_split_equal_the_torch_path(kv_dtype):
    from worker.engine import attention, triton_kernels
    from worker.engine.attention import AttentionMetadata

    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [1, 17, 300, 1024, 2047]
    heads, kvh, d, bs = 32, 8, 128, 16
    blocks = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(blocks) + 4, device="cuda", generator=g).int()
    tables = torch.zeros((len(lens), max(blocks)), dtype=torch.int32, device="cuda")
    k = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[k:k + n]
        k += n
    slots = (sum(blocks) + 4) * bs
    kc = torch.randn((slots, kvh, d), device="cuda", generator=g).to(torch.bfloat16).to(kv_dtype)
    vc = torch.randn((slots, kvh, d), device="cuda", generator=g).to(torch.bfloat16).to(kv_dtype)
    q = torch.randn((len(lens), heads, d), device="cuda", generator=g, dtype=torch.bfloat16)
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = torch.empty_like(q)
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long, device="cuda"), len(lens), tables, lens_t, [], [], bs)
    attention._decode_torch(ref, q, kc, vc, meta, d**-0.5)
    for splits in (1, 4, 16, None):
        out = torch.empty_like(q)
        triton_kernels.paged_decode(out, q, kc, vc, tables, lens_t, bs, d**-0.5, splits=splits)
        assert (out.float() - ref.float()).abs().max() < 2e-2, splits


def test_gpu_fp8_kv_cache_doubles_capacity_and_graphs_equal_eager():
    hf = tiny_hf(seed=4, **MID).to(torch.bfloat16).cuda()
    ps = prompts(5, 6, 20, 200)
    outs, capacity = {}, {}
    for kv, graphs in (("auto", True), ("fp8", True), ("fp8", False)):
        engine = engine_for(hf, block_size=16, budget=2048, max_num_seqs=16, kv_dtype=kv, graphs=graphs,
                            memory_fraction=0.3)
        capacity[kv] = engine.runner.capacity_tokens
        outs[(kv, graphs)] = run(engine, {0: [(f"r{i}", p, 24) for i, p in enumerate(ps)]})
        del engine
        torch.cuda.empty_cache()
    assert outs[("fp8", True)] == outs[("fp8", False)]  # decode graphs read the fp8 cache as eager steps do
    # each prompt prefills in one chunk over its own unrounded K/V: the first token is the bf16 cache's; later
    # ones read fp8 keys and values, and a random model's near-tied logits may then part ways
    assert all(outs[("fp8", True)][k][0] == outs[("auto", True)][k][0] for k in outs[("auto", True)])
    assert capacity["fp8"] >= 1.9 * capacity["auto"]


def test_gpu_gemv_equals_an_fp32_product_for_llama_7b_shapes():
    from worker.engine import triton_kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    for n, k in ((12288, 4096), (4096, 11008), (32000, 4096), (1000, 576)):
        w = (torch.randn((n, k), device="cuda", generator=g) / k**0.5).to(torch.bfloat16)
        x = torch.randn((1, k), device="cuda", generator=g).to(torch.bfloat16)
        ref = x.float() @ w.float().T
        got = triton_kernels.gemv(x, w).float()
        assert (got - ref).abs().max() < 2e-2 * ref.abs().max(), (n, k)  # bf16 rounding of the output


def test_gpu_batch1_decode_runs_ahead_and_matches_transformers(hf_gpu):
    """One sequence: CUDA graph of batch 1 (the GEMV), each step queued before the last is read back."""
    engine = engine_for(hf_gpu, num_blocks=256, block_size=16, max_num_seqs=4)
    assert engine.overlap and engine.runner.device_tokens
    p = prompts(21, 1, 40, 40)[0]
    out = run(engine, {0: [("one", p, 48)]})
    assert out["one"] == hf_greedy(hf_gpu, p, 48)


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "phi3"])
def test_gpu_architectures_match_transformers_with_graphs_and_triton(kind):
    """Each architecture of the table with CUDA graphs, the fused RoPE + cache-write kernel (after Qwen 3's
    q/k norms) and the Triton decode kernel, in fp32, against transformers."""
    from tests.engine.test_architectures import _build

    hf = _build(kind, seed=5, vocab_size=32000, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=2048).cuda()
    engine = engine_for(hf, block_size=16, budget=256, max_num_seqs=16)
    assert engine.runner.graphs
    ps = prompts(7, 6, 5, 200)
    out = run(engine, {0: [(f"r{i}", p, 16) for i, p in enumerate(ps[:3])], 3: [(f"r{i}", p, 16) for i, p in enumerate(ps[3:], 3)]})
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == hf_greedy(hf, p, 16), (kind, i)

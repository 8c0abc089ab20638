"""Tensor parallelism on CPU (gloo): two ranks, each with half the heads and half the MLP, give transformers'
greedy output token for token, with chunked prefill, mixed arrivals and prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import IdTokenizer, hf_greedy, run, save_tiny_tokenizer, tiny_hf
from worker.engine import tensor_parallel as tp
from worker.engine.engine import LLMEngine
from worker.engine.model import LlamaConfig
from worker.engine.model_runner import CacheConfig


@pytest.fixture(scope="module")
def hf():
    return tiny_hf(seed=11, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160)


def test_shard_config_refuses_uneven_splits(hf):
    cfg = LlamaConfig.from_hf(hf.config)
    assert tp.shard_config(cfg, 2).num_kv_heads == 1
    with pytest.raises(ValueError, match="key/value heads"):
        tp.shard_config(cfg, 4)


def test_two_ranks_match_transformers(hf):
    cfg = LlamaConfig.from_hf(hf.config)
    source = tp.ShardSource(cfg, torch.float32, state={k: v.clone() for k, v in hf.state_dict().items()})
    runner = tp.start(2, source, CacheConfig(block_size=4, num_blocks=256), 8, 512)
    try:
        engine = LLMEngine(runner, IdTokenizer(), max_num_seqs=8, max_batched_tokens=48)
        prompts = [[(5 * i + 3 * j) % 300 + 3 for j in range(9 + 17 * i)] for i in range(4)]
        prompts.append(prompts[3][:40] + [7, 8, 9])  # shares full blocks with prompt 3: a prefix-cache hit
        out = run(engine, {0: [(f"r{i}", p, 12) for i, p in enumerate(prompts[:2])],
                           3: [(f"r{i}", p, 12) for i, p in enumerate(prompts[2:], 2)]})
        for i, p in enumerate(prompts):
            assert out[f"r{i}"] == hf_greedy(hf, p, 12), i
        assert runner.model.cfg.num_heads == 2 and runner.kv_caches[0][0].shape[1] == 1  # half the heads each
    finally:
        runner.close()


def test_random_shards_are_slices_of_one_random_model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8)
    whole = tp.ShardSource(cfg, torch.float32).build(1, 0, torch.device("cpu"))
    second = tp.ShardSource(cfg, torch.float32).build(2, 1, torch.device("cpu"))  # rank 1 of 2, built alone
    full = {n: tp.random_tensor(n, s, torch.float32, torch.device("cpu"), 0) for n, s in tp.hf_shapes(cfg).items()}
    assert torch.equal(whole.layers[1].mlp.down_proj.weight, full["model.layers.1.mlp.down_proj.weight"])
    shard = tp.shard_state(full, cfg, 2, 1)
    assert torch.equal(second.layers[0].self_attn.o_proj.weight, shard["model.layers.0.self_attn.o_proj.weight"])
    assert second.layers[0].self_attn.o_proj.weight.shape == (32, 16)
    assert torch.equal(second.lm_head.weight, whole.lm_head.weight)  # replicated tensors agree


def test_ranks_read_only_their_slices_of_a_sharded_safetensors_checkpoint(hf, tmp_path):
    """An HF folder of several safetensors files: the worker process reads no weights, each rank reads its
    own rows and columns from the files, and the result is transformers' greedy output."""
    import pickle

    from worker.loader import ModelLoadError, load_model

    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    save_tiny_tokenizer(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded = load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=512, tensor_parallel=2)
    source = loaded.shards
    assert source.state is None and len(source.files) > 2
    assert len(pickle.dumps(source)) < 4096  # what each spawned rank is sent: paths, not tensors
    runner = tp.start(2, source, CacheConfig(block_size=4, num_blocks=256), 8, 512)
    try:
        engine = LLMEngine(runner, IdTokenizer(), max_num_seqs=8, max_batched_tokens=48)
        prompts = [[(7 * i + 5 * j) % 300 + 3 for j in range(11 + 13 * i)] for i in range(3)]
        out = run(engine, {0: [(f"r{i}", p, 10) for i, p in enumerate(prompts)]})
        for i, p in enumerate(prompts):
            assert out[f"r{i}"] == hf_greedy(hf, p, 10), i
    finally:
        runner.close()
    # a checkpoint of another shape is refused before any rank starts, naming the tensor
    other = tiny_hf(seed=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    wrong = tmp_path / "wrong"
    other.save_pretrained(wrong, safe_serialization=True)
    save_tiny_tokenizer(wrong)
    with open(wrong / "config.json") as f:
        cfg = f.read()
    (wrong / "config.json").write_text(cfg.replace('"intermediate_size": 96', '"intermediate_size": 160'))
    with pytest.raises(ModelLoadError, match="shape mismatch for model.layers.0.mlp.gate_proj.weight"):
        load_model(str(wrong), device="cpu", dtype=torch.float32, context_length=512, tensor_parallel=2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_two_quantized_ranks_answer_like_one_quantized_process(mode):
    """--quantize with --tensor-parallel: each rank quantizes its own slices (row-parallel layers get scales
    over their half of the inputs, so the weights differ from one process's by rounding only)."""
    from worker.engine.model_runner import ModelRunner
    from worker.engine.quant import QuantLinear

    hf = tiny_hf(seed=12, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192)  # int4: 96 per rank
    cfg = LlamaConfig.from_hf(hf.config)
    prompts = [[(3 * i + 7 * j) % 300 + 3 for j in range(10 + 15 * i)] for i in range(3)]

    def source() -> tp.ShardSource:
        return tp.ShardSource(cfg, torch.float32, state={k: v.clone() for k, v in hf.state_dict().items()},
                              quantize=mode, int4_group=32)

    single = ModelRunner(source().build(1, 0, torch.device("cpu")), CacheConfig(block_size=4, num_blocks=256), 8, 512)
    assert isinstance(single.model.layers[0].mlp.down_proj, QuantLinear)
    want = run(LLMEngine(single, IdTokenizer(), max_num_seqs=8, max_batched_tokens=48),
               {0: [(f"r{i}", p, 10) for i, p in enumerate(prompts)]})
    runner = tp.start(2, source(), CacheConfig(block_size=4, num_blocks=256), 8, 512)
    try:
        assert isinstance(runner.model.layers[0].self_attn.o_proj, QuantLinear)
        got = run(LLMEngine(runner, IdTokenizer(), max_num_seqs=8, max_batched_tokens=48),
                  {0: [(f"r{i}", p, 10) for i, p in enumerate(prompts)]})
    finally:
        runner.close()
    same = sum(a == b for i in range(len(prompts)) for a, b in zip(got[f"r{i}"], want[f"r{i}"]))
    assert same >= 0.9 * sum(len(v) for v in want.values()), (got, want)


def test_int4_with_slices_off_its_grid_is_refused_before_any_rank_starts(hf, tmp_path):
    from worker.loader import ModelLoadError, load_model

    hf.save_pretrained(tmp_path, safe_serialization=True)  # intermediate 160: 80 per rank, not a multiple of 32
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(ModelLoadError, match="int4.*80"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=512, tensor_parallel=2,
                   quantize="int4")

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from chatserve.protocol.sampling import SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.model import LlamaConfig, LlamaModel
from worker.engine.model_runner import CacheConfig, ModelRunner


class IdTokenizer:
    """Decodes ids as space-separated numbers (enough for the engine's detokenizer)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def save_tiny_tokenizer(folder, vocab_size: int = 320) -> None:
    """A word-level tokenizer of `vocab_size` ids ("w0", "w1", ...) saved as transformers saves one, so a
    tiny checkpoint folder loads like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def tiny_hf(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False)
    cfg = HFLlamaConfig(**{**kw, **overrides})
    model = LlamaForCausalLM(cfg).float().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def engine_for(hf: LlamaForCausalLM, num_blocks: int = 0, block_size: int = 4, budget: int = 64,
               max_num_seqs: int = 16, prefix_caching: bool = True, overlap: bool | None = None,
               kv_dtype: str = "auto", graphs: bool = True, memory_fraction: float = 0.0) -> LLMEngine:
    """`overlap`: running ahead (the GPU's mode: a step is queued before the last is read back) on or off;
    None: the device's default.
    `memory_fraction`: size the KV cache from that fraction of GPU memory instead of `num_blocks`."""
    cfg = LlamaConfig.from_hf(hf.config)
    p = next(hf.parameters())
    with torch.device(p.device):
        model = LlamaModel(cfg).to(p.dtype)
    model.load_hf_state_dict(hf.state_dict())
    cache = CacheConfig(block_size=block_size, num_blocks=0 if memory_fraction else num_blocks or 1024,
                        gpu_memory_utilization=memory_fraction or 0.9, dtype=kv_dtype)
    runner = ModelRunner(model, cache, max_num_seqs, hf.config.max_position_embeddings, use_cuda_graphs=graphs)
    engine = LLMEngine(runner, IdTokenizer(), max_num_seqs=max_num_seqs, max_batched_tokens=budget,
                       enable_prefix_caching=prefix_caching)
    if overlap is not None:
        engine.overlap = overlap
    return engine


def hf_greedy(hf: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt], device=next(hf.parameters()).device)
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], int]]] | None = None,
        finished: list[str] | None = None) -> dict[str, list[int]]:
    """Step the engine to completion; arrivals[step] = requests added before that step. `finished` gets the
    request ids in the order they finish."""
    arrivals = arrivals or {}
    outs: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, prompt, n in arrivals.get(step, []):
            engine.add_request(rid, prompt, greedy(n))
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished and finished is not None:
                finished.append(o.request_id)
        step += 1
        assert step < 10_000
    return outs


@pytest.fixture(scope="module")
def hf_model() -> LlamaForCausalLM:
    return tiny_hf()


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (every byte a token, a few merges, EOS id 0) trained in memory on JSON-ish
    text: what constrained decoding needs from a tokenizer, at a tiny model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ['{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
              '<tool_call>\n{"name": "search", "arguments": {"query": "llama"}}\n</tool_call>',
              "The capital of France is Paris. true false null 0123456789 [1, 2, 3]"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def prompts_for(count: int, seed: int = 0, lo: int = 4, hi: int = 24, vocab: int = 300) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]

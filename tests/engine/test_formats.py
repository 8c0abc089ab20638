"""Checkpoint formats beyond HF folders: Meta's original layout (sharded, converted on load) and PEFT LoRA
adapters merged at load; each checked token for token against transformers' own `generate`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.engine.test_loading import greedy_tokens
from worker.formats.meta import permute_rotary, unpermute_rotary, write_meta
from worker.loader import ModelLoadError, load_model

TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is chatserve speaking.",
        "LLaMA models were released by Meta with a SentencePiece tokenizer."] * 40
PROMPT = [1, 15, 37, 52, 8, 21]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def meta_folder(tmp_path_factory, tiny):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("meta")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_prefix=str(root / "tokenizer"), vocab_size=96,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    folder = root / "7B"  # Meta's layout: tokenizer.model beside the size folders
    write_meta({k: v.clone() for k, v in tiny.state_dict().items()}, tiny.config, folder, shards=2)
    return folder


def test_rotary_permutation_round_trips():
    w = torch.randn(32, 8)
    assert torch.equal(permute_rotary(unpermute_rotary(w, 4), 4), w)


def test_meta_layout_loads_and_matches_transformers(meta_folder, tiny):
    assert sorted(p.name for p in meta_folder.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                             "params.json"]
    loaded = load_model(str(meta_folder), device="cpu", dtype=torch.float32, context_length=None)
    assert loaded.name == "7B" and loaded.model.cfg.intermediate_size == 160 and loaded.model.cfg.num_kv_heads == 2
    assert greedy_tokens(loaded, PROMPT, 12) == hf_greedy(tiny, PROMPT, 12)
    # the SentencePiece tokenizer came along, with LLaMA's BOS first
    ids = loaded.tokenizer("Hello world").input_ids
    assert ids[0] == 1 and loaded.tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


def test_meta_layout_failures_say_what_is_missing(meta_folder, tmp_path):
    import shutil

    bare = tmp_path / "13B"
    shutil.copytree(meta_folder, bare)
    with pytest.raises(ModelLoadError, match="tokenizer.model not found"):
        load_model(str(bare), device="cpu", dtype=torch.float32, context_length=None)
    shutil.copy(meta_folder.parent / "tokenizer.model", bare / "tokenizer.model")
    (bare / "params.json").write_text(json.dumps({"dim": 64}))
    with pytest.raises(ModelLoadError, match="params.json lacks 'n_layers'"):
        load_model(str(bare), device="cpu", dtype=torch.float32, context_length=None)
    (bare / "params.json").write_text((meta_folder / "params.json").read_text())
    (bare / "consolidated.01.pth").unlink()
    state = torch.load(bare / "consolidated.00.pth", weights_only=True)
    state.pop("layers.1.feed_forward.w2.weight")
    torch.save(state, bare / "consolidated.00.pth")
    with pytest.raises(ModelLoadError, match=r"layers\.1\.feed_forward\.w2\.weight"):
        load_model(str(bare), device="cpu", dtype=torch.float32, context_length=None)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, tiny):
    from transformers import AutoTokenizer

    from worker.loader import EMBEDDED_FILE, embedded_model_path

    folder = tmp_path_factory.mktemp("base")
    tiny.save_pretrained(folder, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(embedded_model_path().parent, gguf_file=EMBEDDED_FILE)
    tok.save_pretrained(folder)
    return folder


def make_adapter(tiny, folder, targets, seed: int, **kw):
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM(tiny.config).eval()
    base.load_state_dict(tiny.state_dict())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:  # B starts at zero: make the adapter do something
                p.normal_(std=0.2)
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload().eval()


def test_lora_adapters_merge_at_load_like_peft(hf_base, tiny, tmp_path):
    a = make_adapter(tiny, tmp_path / "alpaca-lora", ["q_proj", "v_proj"], seed=2)
    loaded = load_model(str(hf_base), device="cpu", dtype=torch.float32, context_length=None,
                        lora=[str(tmp_path / "alpaca-lora")])
    assert greedy_tokens(loaded, PROMPT, 12) == hf_greedy(a, PROMPT, 12)
    assert greedy_tokens(loaded, PROMPT, 12) != hf_greedy(tiny, PROMPT, 12)  # the adapter changed the model
    b = make_adapter(tiny, tmp_path / "all-linear", ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"], seed=3, use_rslora=True)
    loaded = load_model(str(hf_base), device="cpu", dtype=torch.float32, context_length=None,
                        lora=[str(tmp_path / "all-linear")])
    assert greedy_tokens(loaded, PROMPT, 12) == hf_greedy(b, PROMPT, 12)


def test_bad_adapters_are_refused_with_the_reason(hf_base, tiny, tmp_path):
    def load(adapter):
        return load_model(str(hf_base), device="cpu", dtype=torch.float32, context_length=None, lora=[str(adapter)])

    with pytest.raises(ModelLoadError, match="adapter_config.json not found"):
        load(tmp_path)
    bigger = LlamaForCausalLM(LlamaConfig(**{**tiny.config.to_dict(), "hidden_size": 128,
                                             "intermediate_size": 256})).eval()
    make_adapter(bigger, tmp_path / "other-size", ["q_proj"], seed=4)
    with pytest.raises(ModelLoadError, match="another model size"):
        load(tmp_path / "other-size")
    cfg = json.loads((tmp_path / "other-size" / "adapter_config.json").read_text())
    (tmp_path / "other-size" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ModelLoadError, match="DoRA"):
        load(tmp_path / "other-size")

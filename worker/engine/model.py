"""LLaMA-family decoder over a flat batch of tokens from many sequences, with attention on the paged KV cache.

One model for every architecture served: LLaMA 1/2/3 (SmolLM2, Vicuna, Alpaca, BELLE, ...), Mistral, Qwen 2
and 3, Phi-3. They differ in a few switches, the `ARCHITECTURES` table: biases on q/k/v (Qwen 2), an RMSNorm
on each head of q and k before RoPE (Qwen 3), checkpoints with q/k/v and gate/up already fused (Phi-3).
Tokens of all scheduled sequences are packed into one dimension (`[T, dim]`), so the projections and MLP
run as single matmuls whatever mix of decode and prefill a step holds. q/k/v and gate/up are fused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker.engine import triton_kernels
from worker.engine.attention import AttentionMetadata, paged_attention


@dataclass(frozen=True, slots=True)
class Arch:
    """What an architecture changes in the LLaMA decoder."""

    qkv_bias: bool = False  # q/k/v projections with biases (Qwen 2)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen 3)


# HF `architectures` names and GGUF / config `model_type`s served, with their switches
ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": Arch(), "MistralForCausalLM": Arch(), "Qwen2ForCausalLM": Arch(qkv_bias=True),
    "Qwen3ForCausalLM": Arch(qk_norm=True), "Phi3ForCausalLM": Arch(),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def architecture_of(hf: Any) -> str:
    """The architecture a transformers config declares (its `architectures`, else its `model_type`)."""
    declared = getattr(hf, "architectures", None) or []
    return declared[0] if declared else MODEL_TYPES.get(getattr(hf, "model_type", ""), str(getattr(hf, "model_type", "")))


def sliding_window_of(hf: Any) -> int | None:
    """The attention window a config enables (Mistral v0.1; Qwen's `use_sliding_window`), or None."""
    window = getattr(hf, "sliding_window", None)
    if getattr(hf, "model_type", "") in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        return None
    return int(window) if window else None


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    qkv_bias: bool = False
    o_bias: bool = False  # LLaMA's and Qwen 3's `attention_bias` also biases o_proj
    qk_norm: bool = False

    @classmethod
    def from_hf(cls, hf: Any) -> LlamaConfig:
        heads = hf.num_attention_heads
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        scaling = getattr(hf, "rope_scaling", None) or None
        rope_params = getattr(hf, "rope_parameters", None) or {}
        theta = getattr(hf, "rope_theta", None) or rope_params.get("rope_theta", 10000.0)
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        arch = ARCHITECTURES.get(architecture_of(hf), Arch())
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            bos_token_id=hf.bos_token_id,
            eos_token_ids=eos_ids,
            qkv_bias=arch.qkv_bias or attention_bias,
            o_bias=attention_bias,
            qk_norm=arch.qk_norm,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":  # LLaMA-3.1 frequency-dependent scaling
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "yarn":
        inv = _yarn_inv_freq(cfg, scaling)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r} (served: linear, llama3, yarn)")
    return inv.float()


def _yarn_original(cfg: LlamaConfig, scaling: dict[str, Any]) -> tuple[float, int]:
    original = int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    return float(factor), original


def _yarn_inv_freq(cfg: LlamaConfig, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: interpolated (slow) dimensions blended into extrapolated (fast) ones along a linear ramp
    between the dimensions that turn beta_fast and beta_slow times over the original context."""
    factor, original = _yarn_original(cfg, scaling)
    dim, base = cfg.head_dim, cfg.rope_theta
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (1 / (factor * pos)) * (1 - extrapolate) + (1 / pos) * extrapolate


def rope_attention_factor(cfg: LlamaConfig) -> float:
    """What a RoPE scaling multiplies cos and sin by (YaRN's mscale): it scales q and k alike, so the
    attention scores by its square, which the softmax scale takes."""
    scaling = dict(cfg.rope_scaling or ())
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, _ = _yarn_original(cfg, scaling)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


@dataclass(slots=True)
class Rope:
    """Rotary-embedding inputs of one step: positions [T]; cos/sin [T, 1, head_dim] on the torch path."""

    positions: torch.Tensor
    inv_freq: torch.Tensor
    fused: bool = False  # CUDA: the Triton kernel applies it and writes K/V to the cache in one launch
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel (fp32 inside) instead of six
            return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); (norm(x), x) for the first layer. x, residual: [T, dim].
        On CUDA one Triton launch does the add and the norm (the residual is updated in place)."""
        if x.is_cuda and x.dim() == 2 and triton_kernels.available():
            return triton_kernels.add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self(x), x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim] (HF's rotate-half convention)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs over the tensor-parallel ranks (no-op without a group)."""
    if group is not None:
        torch.distributed.all_reduce(x, group=group)
    return x


class Linear(nn.Linear):
    """nn.Linear whose one-row products (batch-1 decode) run the Triton GEMV on CUDA: cuBLAS streams
    LLaMA-7B's weights at one row at 2.1-2.7 TB/s on H100, the GEMV at 2.5-3.1 (benchmarks/gemv.py)."""

    use_gemv = True  # benchmarks turn it off for cuBLAS's figure (before CUDA graphs are captured)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        one_row = x.dim() == 2 and x.shape[0] == 1 and x.stride(-1) == 1 and w.stride(-1) == 1
        if self.use_gemv and one_row and x.is_cuda and self.bias is None and triton_kernels.available():
            return triton_kernels.gemv(x, w)
        return super().forward(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.d, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.d**-0.5 * rope_attention_factor(cfg) ** 2
        self.tp_group: Any = None  # tensor parallel: this rank holds some heads; o_proj's partial sums add up

    def forward(self, x: torch.Tensor, rope: Rope, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self._norm_qk(self.qkv_proj(x))  # [T, (H + 2*KVH) * D]
        sizes = [self.h * self.d, self.kvh * self.d, self.kvh * self.d]
        if rope.fused:
            triton_kernels.rope_and_cache(qkv, rope.positions, rope.inv_freq, kv[0], kv[1], meta.slot_mapping,
                                          self.h, self.kvh, self.d)
            q, k, v = qkv.split(sizes, dim=-1)
            o = paged_attention(q.view(t, self.h, self.d), k.view(t, self.kvh, self.d), v.view(t, self.kvh, self.d),
                                kv[0], kv[1], meta, self.scale, written=True)
        else:
            q, k, v = qkv.split(sizes, dim=-1)
            q = apply_rope(q.view(t, self.h, self.d), rope.cos, rope.sin)
            k = apply_rope(k.view(t, self.kvh, self.d), rope.cos, rope.sin)
            o = paged_attention(q, k, v.view(t, self.kvh, self.d), kv[0], kv[1], meta, self.scale)
        return all_reduce(self.o_proj(o.reshape(t, self.h * self.d)), self.tp_group)

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen 3: each head of q and of k RMS-normed (over head_dim), in place in qkv [..., (H + 2*KVH) * D]."""
        if self.q_norm is None or self.k_norm is None:
            return qkv
        hd, kd = self.h * self.d, self.kvh * self.d
        q, k = qkv[..., :hd], qkv[..., hd : hd + kd]
        q.copy_(self.q_norm(q.unflatten(-1, (self.h, self.d))).flatten(-2))
        k.copy_(self.k_norm(k.unflatten(-1, (self.kvh, self.d))).flatten(-2))
        return qkv

    def dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Cache-free causal attention over a right-padded batch x [B, L, dim] (embeddings)."""
        b, n = x.shape[:2]
        q, k, v = self._norm_qk(self.qkv_proj(x)).split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q = apply_rope(q.view(b, n, self.h, self.d), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(b, n, self.kvh, self.d), cos, sin).transpose(1, 2)
        v = v.view(b, n, self.kvh, self.d).transpose(1, 2)
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                       enable_gqa=self.h != self.kvh)
        return all_reduce(self.o_proj(o.transpose(1, 2).reshape(b, n, self.h * self.d)), self.tp_group)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.tp_group: Any = None  # tensor parallel: this rank holds a slice of the intermediate size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda and gate_up.dim() == 2 and triton_kernels.available():
            return all_reduce(self.down_proj(triton_kernels.silu_mul(gate_up)), self.tp_group)
        gate, up = gate_up.split(self.inter, dim=-1)
        return all_reduce(self.down_proj(nn.functional.silu(gate) * up), self.tp_group)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, kv, meta):  # type: ignore[no-untyped-def]
        """x: the previous layer's output, residual: the stream it adds to (None before the first layer).
        Returns (this layer's MLP output, the residual stream before it), so the next add fuses with a norm."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope, kv, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, positions: torch.Tensor) -> Rope:
        if positions.is_cuda and triton_kernels.available():
            return Rope(positions, self.inv_freq, fused=True)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, head_dim]
        return Rope(positions, self.inv_freq, cos=emb.cos(), sin=emb.sin())

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
               meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, dim]."""
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv, meta)
        return self.norm.add_forward(x, residual)[0]

    def dense_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A right-padded batch [B, L] without the KV cache -> final-normed hidden states [B, L, dim]. Causal
        attention keeps each sequence's real tokens blind to the padding after them."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(input_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]  # [1, L, 1, head_dim]
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = x + layer.self_attn.dense(layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # --- weights ------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in transformers' LlamaForCausalLM, fusing q/k/v and gate/up."""
        state = {k.removeprefix("model."): v for k, v in state.items()}
        own = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor) -> None:
            if name not in own:
                raise ValueError(f"unexpected weight {name!r}")
            if own[name].shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(own[name].shape)}")
            own[name].copy_(tensor)
            loaded.add(name)

        for i in range(self.cfg.num_layers):  # fused here unless the checkpoint is (Phi-3)
            p = f"layers.{i}."
            for kind in ("weight", "bias") if self.cfg.qkv_bias else ("weight",):
                if p + f"self_attn.q_proj.{kind}" in state:
                    put(p + f"self_attn.qkv_proj.{kind}",
                        torch.cat([state.pop(p + f"self_attn.{n}_proj.{kind}") for n in "qkv"]))
            if p + "mlp.gate_proj.weight" in state:
                put(p + "mlp.gate_up_proj.weight", torch.cat([state.pop(p + "mlp.gate_proj.weight"),
                                                               state.pop(p + "mlp.up_proj.weight")]))
        if "lm_head.weight" in state and not self.cfg.tie_word_embeddings:
            put("lm_head.weight", state.pop("lm_head.weight"))
        state.pop("lm_head.weight", None)
        for name, tensor in state.items():
            if "rotary_emb" in name:
                continue
            put(name, tensor)
        missing = set(own) - loaded - ({"lm_head.weight"} if self.cfg.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")
        self.tie_weights()

    def tie_weights(self) -> None:
        """Re-tie lm_head to the embedding (moving a module with to_empty() unties them)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

"""Weight-only quantization of the decoder's linear layers: `--quantize int8` (per output channel,
symmetric) or `--quantize int4` (groups of 32-128 input channels, asymmetric min/max, gpt-fast's scheme).
Embeddings, norms and the LM head stay in the model's dtype.

Kernels: int4 uses torch's tinygemm (`_weight_int4pack_mm` on CUDA, `..._for_cpu` on CPU); int8 uses
torch's `_weight_int8pack_mm` on CPU and, on CUDA, a Triton kernel that reads int8 weights and scales them
in the epilogue for decode-sized batches (M <= 64), and a dequantize + cuBLAS matmul for prefill-sized ones.
Decode is bound by reading weights, so halving (int8) or quartering (int4) the bytes is the speed-up.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)
MODES = ("int8", "int4")
SMALL_M = 64  # batches up to this many tokens take the Triton int8 kernel on CUDA


DEFAULT_INT4_GROUP = 128


def int4_group_size(in_features: int, preferred: int = DEFAULT_INT4_GROUP) -> int:
    """The preferred group size, or the largest smaller one (64, 32) that divides the input size."""
    for g in (256, 128, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"int4 needs the input size to be a multiple of 32 (got {in_features})")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], scales [N] in w's dtype), symmetric per output channel."""
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w32 / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales.to(w.dtype)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (values 0..15 as int32 [N, K], scales_and_zeros [K/group, N, 2]); w ~ (q - 8) * s + z."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    hi, lo = wg.amax(dim=-1, keepdim=True), wg.amin(dim=-1, keepdim=True)
    scales = ((hi - lo) / 15.0).clamp(min=1e-6)
    zeros = lo + scales * 8.0
    q = torch.round((wg - lo) / scales).clamp(0, 15).to(torch.int32).reshape(n, k)
    sz = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/group, N, 2]
    return q, sz


class QuantLinear(nn.Module):
    """A bias-free linear layer y = x W^T with W held as int8 or int4."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = DEFAULT_INT4_GROUP):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization {mode!r} (expected one of {', '.join(MODES)})")
        w = linear.weight.detach()
        self.mode, self.out_features, self.in_features = mode, w.shape[0], w.shape[1]
        self.dtype = w.dtype
        if mode == "int8":
            q, s = quantize_int8(w)
            self.register_buffer("weight", q)
            self.register_buffer("scales", s)
        else:
            self.group = int4_group_size(self.in_features, group_size)
            q, sz = quantize_int4(w, self.group)
            if w.is_cuda:
                # innerKTiles: 8 needs K % 256 == 0 (7B shapes), smaller tiles cover small models
                self.inner_k = next(t for t in (8, 4, 2) if self.in_features % (t * 32) == 0)
                packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(packed, self.inner_k))
            else:
                self.inner_k = 2
                self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, self.inner_k))
            self.register_buffer("scales", sz.to(torch.bfloat16))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "int8":
            if x2.is_cuda:
                y = int8_matmul(x2, self.weight, self.scales)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2.to(self.scales.dtype), self.weight, self.scales)
        elif x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.weight, self.group, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.weight, self.group,
                                                           self.scales)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def int8_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (w [N, K] int8 * scales [N])^T on CUDA."""
    m = x.shape[0]
    if m > SMALL_M:  # compute-bound: dequantize once, let cuBLAS run the big matmul
        return x @ (w.to(x.dtype) * scales[:, None].to(x.dtype)).T
    out = torch.empty((m, w.shape[0]), dtype=x.dtype, device=x.device)
    block_m = max(16, 1 << (m - 1).bit_length())
    kernel = _int8_kernel()
    grid = lambda meta: ((w.shape[0] + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)  # noqa: E731
    kernel[grid](x, w, scales, out, m, w.shape[0], w.shape[1], x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                 out.stride(0), out.stride(1), BLOCK_M=block_m)
    return out


@functools.lru_cache(maxsize=1)
def _int8_kernel():  # built lazily: CPU-only hosts never import triton
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
               for bn, bk, nw, ns in [(32, 256, 4, 4), (32, 512, 4, 3), (64, 128, 4, 4), (64, 256, 4, 4),
                                      (64, 512, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (16, 512, 4, 4)]]

    # tuned once per row bucket (BLOCK_M), not per row count: a new prompt length must not autotune mid-serving
    @triton.autotune(configs=configs, key=["BLOCK_M", "N", "K"])
    @triton.jit(do_not_specialize=["M"])
    def int8_weight_kernel(a_ptr, b_ptr, s_ptr, c_ptr, M, N, K, s_am, s_ak, s_bn, s_bk, s_cm, s_cn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one program per BLOCK_N output columns, all M rows: each int8 weight is read once
        pid = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak  # [BLOCK_M, BLOCK_K]
        b_ptrs = b_ptr + rn[None, :] * s_bn + rk[:, None] * s_bk  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            kmask = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0)
            acc += tl.dot(a, b.to(a.dtype))
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
        c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    return int8_weight_kernel


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_INT4_GROUP) -> None:
    """Replace every decoder projection (q/k/v, o, gate/up, down) by its quantized form, in place.

    int4 groups: 128 by default (7B: 3.96 GB of weights); a model read from a 4-bit GGUF file already sits
    on a 4-bit grid per 32 weights (Q4_0/Q4_1/Q4_K), so the loader asks for 32 there: lossless. An unknown
    mode is refused by the first layer's QuantLinear, before anything is replaced."""
    before = weight_bytes(model)
    for layer in model.layers:  # type: ignore[attr-defined]
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = QuantLinear(attn.qkv_proj, mode, group_size)
        attn.o_proj = QuantLinear(attn.o_proj, mode, group_size)
        mlp.gate_up_proj = QuantLinear(mlp.gate_up_proj, mode, group_size)
        mlp.down_proj = QuantLinear(mlp.down_proj, mode, group_size)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("quantized to %s: weights %.2f GB -> %.2f GB", mode, before / 1e9, weight_bytes(model) / 1e9)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (a tied LM head counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total

"""Attention over the paged KV cache.

Cache layout per layer: `k_cache, v_cache: [num_blocks * block_size, kv_heads, head_dim]` (a flat slot
index = block_id * block_size + offset). New tokens' K/V are written to their slots, then each sequence
attends over its whole context:
- decode tokens (one query each): on CUDA a Triton kernel that walks the block table in place (no gathered
  copy of the cache); elsewhere a torch path.
- prefill chunks with no earlier context: SDPA (flash) per sequence over the new keys;
- chunks that continue a cached context (prefix-cache hits, later chunks): one masked SDPA call for all of
  them over their gathered blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine import triton_kernels


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step metadata; sequences are ordered decode first, then prefill chunks."""

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    num_decode: int  # the first num_decode tokens are single-token decode sequences
    # decode part
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [num_decode] int64 (int32 works, but compiles another kernel variant)
    # prefill part, one entry per sequence (python ints: these run per sequence)
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]  # tokens of context including this chunk
    block_size: int
    # chunks that continue a cached context (prefix-cache hits, later chunks): attended in ONE batched call
    ctx_batch: ContextBatch | None = None


@dataclass(slots=True)
class ContextBatch:
    """Prefill chunks whose keys start before the chunk, padded into one batch (built once per step).

    tables [B, W] long; src [N] rows of the flat token batch; dest [N] rows of the padded [B * max_q] query
    grid; mask [B, 1, max_q, W * block_size] bool (causal with each sequence's offset, padding masked)."""

    tables: torch.Tensor
    src: torch.Tensor
    dest: torch.Tensor
    mask: torch.Tensor
    max_q: int

    @classmethod
    def build(cls, starts: list[int], qlens: list[int], ctxs: list[int], tables: torch.Tensor,
              block_size: int, device: torch.device) -> ContextBatch:
        b, max_q = len(qlens), max(qlens)
        src = torch.cat([torch.arange(s, s + q) for s, q in zip(starts, qlens)])
        dest = torch.cat([torch.arange(i * max_q, i * max_q + q) for i, q in enumerate(qlens)])
        keys = tables.shape[1] * block_size
        qlen_t, ctx_t = torch.tensor(qlens), torch.tensor(ctxs)
        qpos = torch.arange(max_q).view(1, max_q, 1) + (ctx_t - qlen_t).view(b, 1, 1)  # absolute position
        kpos = torch.arange(keys).view(1, 1, keys)
        mask = (kpos <= qpos) & (kpos < ctx_t.view(b, 1, 1))
        mask[:, :, 0] = True  # padded query rows see one key instead of none (no NaN); they are discarded
        return cls(tables.to(device), src.to(device), dest.to(device), mask.unsqueeze(1).to(device), max_q)


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value: K/V are clamped to it (an unscaled cast would give NaN)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    # k, v: [num_tokens, kv_heads, head_dim]
    if k_cache.dtype != k.dtype:  # an fp8 cache, written as bytes (index_copy_ has no fp8 kernel on CPU)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        k, v = to_fp8(k).view(torch.uint8), to_fp8(v).view(torch.uint8)
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a chunk over its own keys. q: [L, H, D], k/v: [L, KVH, D] -> [L, H, D]."""
    h, kvh = q.shape[1], k.shape[1]
    if kvh != h:
        k = k.repeat_interleave(h // kvh, dim=1)
        v = v.repeat_interleave(h // kvh, dim=1)
    # 4-D [1, H, L, D]: the flash / memory-efficient kernels take only 4-D inputs (3-D falls back to math)
    qt, kt, vt = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=q.shape[0] > 1, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def _gather_blocks(cache: torch.Tensor, tables: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The blocks listed in tables [B, W] (long) as one contiguous [B, W * block_size, KVH, D] copy, in
    `dtype` (an fp8 cache is widened to the model's dtype)."""
    b, w = tables.shape
    kvh, d = cache.shape[1], cache.shape[2]
    out = cache.view(-1, block_size, kvh, d).index_select(0, tables.flatten()).view(b, w * block_size, kvh, d)
    return out if out.dtype == dtype else out.to(dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, written: bool = False) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for the T new tokens. Returns [T, H, D].
    `written`: K/V are already in the cache (the fused rope kernel wrote them)."""
    if not written:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        if q.is_cuda and triton_kernels.available():
            triton_kernels.paged_decode(out[:nd], q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                        meta.decode_context_lens, meta.block_size, scale)
        else:
            _decode_torch(out[:nd], q[:nd], k_cache, v_cache, meta, scale)
    start = nd
    for qlen, ctx in zip(meta.prefill_query_lens, meta.prefill_context_lens):
        end = start + qlen
        if ctx == qlen:  # nothing cached before this chunk: attend over the new keys directly (flash)
            out[start:end] = _causal_sdpa(q[start:end], k[start:end], v[start:end], scale)
        start = end
    if meta.ctx_batch is not None:
        _attend_with_context(out, q, k_cache, v_cache, meta.ctx_batch, meta.block_size, scale)
    return out


def _attend_with_context(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cb: ContextBatch, block_size: int, scale: float) -> None:
    """All chunks with cached context in one masked attention call (a loop per sequence cost ~100 us of
    host time per sequence and layer: with 64 chats resuming at once that was most of a step)."""
    b = cb.tables.shape[0]
    heads, d = q.shape[1], q.shape[2]
    kvh = k_cache.shape[1]
    kc = _gather_blocks(k_cache, cb.tables, block_size, q.dtype)  # [B, L, KVH, D]
    vc = _gather_blocks(v_cache, cb.tables, block_size, q.dtype)
    qp = q.new_zeros((b * cb.max_q, heads, d))
    qp[cb.dest] = q[cb.src]
    gqa = {}
    if kvh != heads:
        if q.is_cuda:
            kc = kc.repeat_interleave(heads // kvh, dim=2)
            vc = vc.repeat_interleave(heads // kvh, dim=2)
        else:  # CPU: SDPA groups the heads itself (no copies of K/V; ~10% faster here)
            gqa = {"enable_gqa": True}
    o = F.scaled_dot_product_attention(qp.view(b, cb.max_q, heads, d).transpose(1, 2), kc.transpose(1, 2),
                                       vc.transpose(1, 2), attn_mask=cb.mask, scale=scale, **gqa)  # [B, H, max_q, D]
    out[cb.src] = o.transpose(1, 2).reshape(b * cb.max_q, heads, d)[cb.dest]


def _decode_torch(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> None:
    """All decode sequences at once: gather their blocks into [B, L, KVH, D] and attend with two grouped
    matmuls (query heads grouped by KV head, no repeat of K/V; softmax in fp32). On CPU this is ~6x faster
    than SDPA with a padding mask for one query token."""
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    tables = meta.decode_block_tables.long()  # [B, W]
    kc = _gather_blocks(k_cache, tables, meta.block_size, q.dtype)  # [B, L, KVH, D]
    vc = _gather_blocks(v_cache, tables, meta.block_size, q.dtype)
    bsz, length, kvh, d = kc.shape
    group = q.shape[1] // kvh
    qg = q.view(bsz, kvh, group, d)
    scores = torch.matmul(qg, kc.permute(0, 2, 3, 1)).float() * scale  # [B, KVH, G, L]
    valid = torch.arange(length, device=q.device).unsqueeze(0) < meta.decode_context_lens.unsqueeze(1).long()
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    out.copy_(torch.matmul(probs, vc.permute(0, 2, 1, 3)).reshape(bsz, kvh * group, d))

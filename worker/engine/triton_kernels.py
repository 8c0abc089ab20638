"""The engine's Triton kernels (CUDA only; built on first use, so CPU hosts never import triton):

- paged decode attention, reading K/V (bf16 or fp8) straight from the paged cache: one program per
  (sequence, query head[, part of the context]) walks the block table in tiles with an online softmax, so the
  cache is never gathered into a contiguous copy; small batches split contexts and merge the parts;
- RoPE fused with the K/V cache write; residual add fused with RMSNorm; SiLU fused with the up product;
- a GEMV for one-row matmuls (batch-1 decode), closer to the HBM bandwidth than cuBLAS there.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# best of a sweep on H100 (benchmarks/profile_step.py): 2.86 TB/s at batch 128 x 800 tokens x 32 heads
DECODE_CONFIG = {"tile": 128, "num_warps": 2, "num_stages": 3}
# split-context decode (flash-decoding): tokens per tile, warps
SPLIT_CONFIG = {"tile": 32, "num_warps": 2, "num_stages": 2}
# an fp8 cache: half the bytes per tile for the same arithmetic. With bf16's 128-token tiles the fp8 kernel
# took as long as the bf16 one (1.4 TB/s at batch 16 x 2048 tokens on H100); 64-token tiles: 2.7 TB/s at
# batch 256 x 608 tokens (profile_step.py --sweep), the 512-request workload 3,955 -> 4,500 tok/s
FP8_DECODE_CONFIG = {"tile": 64, "num_warps": 2, "num_stages": 2}
MAX_SPLITS = 16


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(batch: int, heads: int, num_sms: int) -> int:
    """How many parts each sequence's context is split into: enough (sequence, head, part) programs to
    fill the GPU about twice when batch x heads alone would leave SMs idle (batch 1: 32 programs on 132
    SMs), none when it fills them already. Depends on shapes only, so a captured graph keeps it."""
    programs = batch * heads
    if programs >= num_sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-2 * num_sms // programs)))


@functools.lru_cache(maxsize=1)
def _decode_kernels():  # built lazily: nothing happens at import time, and CPU-only hosts never import triton
    import triton
    import triton.language as tl

    # the table width changes from step to step: left unspecialized, or every new width's divisibility by 16
    # (or width 1) compiles another variant mid-serving, a ~1 s stall of every stream
    @triton.jit(do_not_specialize=["stride_bt"])
    def paged_decode_kernel(
        out_ptr, part_o_ptr, part_ml_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, scale,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_ks, stride_kh, stride_bt,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        """Program (sequence b, query head h, part): an online softmax over the part's tokens, TILE at a
        time, walking the block table. One part: the output itself; several: partial results to merge."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        part = tl.program_id(2)
        kvh = h // GROUP
        length = tl.load(lens_ptr + b)
        per = tl.cdiv(tl.cdiv(length, SPLITS), TILE) * TILE  # this part's tokens: whole tiles
        lo = part * per
        hi = tl.minimum(lo + per, length)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        offs = tl.arange(0, TILE)
        for start in range(lo, hi, TILE):
            pos = start + offs
            valid = pos < hi
            page = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
            slot = page.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)  # bf16 or fp8 cache
            s = tl.sum(k * q[None, :], axis=1)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        if SPLITS == 1:
            o = acc / l_i
            tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))
        else:
            row = (b * tl.num_programs(1) + h) * SPLITS + part  # an empty part leaves m = -inf, l = 0, acc = 0
            tl.store(part_o_ptr + row * HEAD_DIM + d, acc)
            one = tl.arange(0, 1)
            tl.store(part_ml_ptr + row * 2 + one, m_i)
            tl.store(part_ml_ptr + row * 2 + 1 + one, l_i)

    @triton.jit
    def combine_kernel(out_ptr, part_o_ptr, part_ml_ptr, stride_ob, stride_oh,
                       HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        heads = tl.num_programs(1)
        parts = tl.arange(0, SPLITS_P2)
        have = parts < SPLITS
        rows = (b * heads + h) * SPLITS + parts
        m = tl.load(part_ml_ptr + rows * 2, mask=have, other=float("-inf"))
        l_ = tl.load(part_ml_ptr + rows * 2 + 1, mask=have, other=0.0)
        m_all = tl.max(m, axis=0)  # part 0 always holds tokens (length >= 1)
        w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
        d = tl.arange(0, HEAD_DIM)
        acc = tl.load(part_o_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=have[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))

    return paged_decode_kernel, combine_kernel


def paged_decode(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                 config: dict | None = None, splits: int | None = None) -> None:
    """Decode attention over the paged cache (bf16/fp16 or fp8 K/V, read in fp32). q/out [B, H, D];
    k_cache/v_cache [slots, KVH, D]; block_tables [B, max_blocks] int32; context_lens [B]. Small batches
    split each context across several programs and merge their partial softmaxes (flash-decoding);
    `splits` overrides the choice (tests, sweeps)."""
    import triton

    bsz, heads, head_dim = q.shape
    if splits is None:
        splits = decode_splits(bsz, heads, _num_sms(q.device.index or 0)) if q.is_cuda else 1
    kernel, combine = _decode_kernels()
    if config is None:
        config = FP8_DECODE_CONFIG if k_cache.element_size() == 1 else DECODE_CONFIG if splits == 1 else SPLIT_CONFIG
    part_o = part_ml = out  # unused by one pass
    if splits > 1:
        part_o = torch.empty((bsz * heads * splits, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((bsz * heads * splits, 2), dtype=torch.float32, device=q.device)
    kernel[(bsz, heads, splits)](
        out, part_o, part_ml, q, k_cache, v_cache, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        GROUP=heads // k_cache.shape[1], BLOCK_SIZE=block_size, HEAD_DIM=head_dim, TILE=config["tile"], SPLITS=splits,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if splits > 1:
        combine[(bsz, heads)](out, part_o, part_ml, out.stride(0), out.stride(1), HEAD_DIM=head_dim, SPLITS=splits,
                              SPLITS_P2=triton.next_power_of_2(splits), num_warps=1)


@functools.lru_cache(maxsize=1)
def _rope_cache_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_cache_kernel(
        qkv_ptr, pos_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        stride_t, stride_ks, stride_kh,
        NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, FP8: tl.constexpr,
    ):
        t = tl.program_id(0)
        head = tl.program_id(1)  # 0..NUM_HEADS+NUM_KV-1: query heads, then key heads
        half = tl.arange(0, HEAD_DIM // 2)
        pos = tl.load(pos_ptr + t).to(tl.float32)
        angle = pos * tl.load(inv_freq_ptr + half)
        c = tl.cos(angle)
        s = tl.sin(angle)
        base = qkv_ptr + t * stride_t + head * HEAD_DIM
        x1 = tl.load(base + half).to(tl.float32)
        x2 = tl.load(base + HEAD_DIM // 2 + half).to(tl.float32)
        o1 = (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty)
        o2 = (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty)
        tl.store(base + half, o1)
        tl.store(base + HEAD_DIM // 2 + half, o2)
        if head >= NUM_HEADS:  # a key head: also write K and the matching V head to the cache slot
            kh = head - NUM_HEADS
            slot = tl.load(slot_ptr + t).to(tl.int64)
            kdst = k_cache_ptr + slot * stride_ks + kh * stride_kh
            d = tl.arange(0, HEAD_DIM)
            v = tl.load(qkv_ptr + t * stride_t + (NUM_HEADS + NUM_KV + kh) * HEAD_DIM + d)
            if FP8:  # clamped to e4m3's range first (an out-of-range cast is NaN)
                k1 = tl.minimum(tl.maximum(o1.to(tl.float32), -448.0), 448.0)
                k2 = tl.minimum(tl.maximum(o2.to(tl.float32), -448.0), 448.0)
                vf = tl.minimum(tl.maximum(v.to(tl.float32), -448.0), 448.0)
                tl.store(kdst + half, k1.to(k_cache_ptr.dtype.element_ty))
                tl.store(kdst + HEAD_DIM // 2 + half, k2.to(k_cache_ptr.dtype.element_ty))
                tl.store(v_cache_ptr + slot * stride_ks + kh * stride_kh + d, vf.to(v_cache_ptr.dtype.element_ty))
            else:
                tl.store(kdst + half, o1)
                tl.store(kdst + HEAD_DIM // 2 + half, o2)
                tl.store(v_cache_ptr + slot * stride_ks + kh * stride_kh + d, v)

    return rope_cache_kernel


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slots: torch.Tensor, num_heads: int, num_kv: int, head_dim: int) -> None:
    """In place on qkv [T, (H + 2*KVH) * D]: rotary embedding of q and k (rotate-half convention), and
    K/V of every token written to its cache slot. One launch instead of ~16 small kernels per layer."""
    t = qkv.shape[0]
    _rope_cache_kernel()[(t, num_heads + num_kv)](
        qkv, positions, inv_freq, k_cache, v_cache, slots, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV=num_kv, HEAD_DIM=head_dim, FP8=k_cache.dtype != qkv.dtype, num_warps=1,
    )


@functools.lru_cache(maxsize=1)
def _norm_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
                           HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # residual += x (rounded to the model dtype, as the unfused add would), in place
            r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(r_ptr.dtype.element_ty)
            tl.store(r_ptr + row * stride_r + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32) * w  # HF: weight * normed.to(dtype)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # silu(gate) in the model dtype, then * up
        tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=mask)

    return add_rmsnorm_kernel, silu_mul_kernel


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(residual + x), residual + x) in one launch, the new residual written in place; without a
    residual: (rmsnorm(x), x). x, residual: [T, dim]. Replaces an add and a norm kernel per call."""
    import triton

    t, dim = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    kernel = _norm_kernels()[0]
    r = residual if residual is not None else x
    kernel[(t,)](x, r, weight, out, dim, eps, x.stride(0), r.stride(0), out.stride(0),
                 HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out, r


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 * I] -> [T, I], one launch instead of two."""
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _norm_kernels()[1][(t, (inter + block - 1) // block)](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                          BLOCK=block, num_warps=4)
    return out


def gemv_config(k: int) -> dict:
    """Batch-1 decode's matmuls: two weight rows per program, 1024 columns a tile. Best (or within 1%) of
    benchmarks/gemv.py's sweep on H100 for every LLaMA-7B shape: q/k/v 2.93 TB/s, o 2.48, gate/up 3.04,
    down (K 11008, 8 warps) 2.65, lm_head 3.07; cuBLAS at one row 2.69 / 2.11 / 2.64 / 2.53 / 2.68."""
    return {"block_n": 2, "block_k": 1024, "num_warps": 8 if k > 8192 else 4, "num_stages": 1}


@functools.lru_cache(maxsize=1)
def _gemv_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_w,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            if EVEN_K:
                x = tl.load(x_ptr + kk)
                w = tl.load(w_rows + kk[None, :], mask=row_ok[:, None], other=0.0)
            else:
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
                w = tl.load(w_rows + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)

    return gemv_kernel


def gemv(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] (fp32 accumulation): a memory-bound matrix-vector product that
    streams the weight once, every program reading whole contiguous rows."""
    n, k = weight.shape
    c = config or gemv_config(k)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    bn, bk = c["block_n"], c["block_k"]
    _gemv_kernel()[((n + bn - 1) // bn,)](x, weight, out, n, k, weight.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                          EVEN_K=k % bk == 0, num_warps=c["num_warps"],
                                          num_stages=c["num_stages"])
    return out

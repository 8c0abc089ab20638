"""Checks of the Triton kernels run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set
before triton is imported: tests/kernels/test_triton_interpreted.py runs this module in a subprocess).
Each kernel is compared with the torch path the engine takes where Triton is not available."""

from __future__ import annotations

import sys

import torch

from worker.engine import attention, triton_kernels
from worker.engine.attention import FP8, AttentionMetadata, to_fp8
from worker.engine.model import apply_rope


def paged_setup(seed: int, lens: list[int], heads: int, kvh: int, d: int, block: int, dtype: torch.dtype,
                cache_dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    blocks_per = [-(-n // block) for n in lens]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered pages
    tables, k = [], 0
    for n in blocks_per:
        tables.append(perm[k:k + n])
        k += n
    width = max(blocks_per)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks * block, kvh, d)
    kc = torch.randn(shape, generator=g).to(dtype)
    vc = torch.randn(shape, generator=g).to(dtype)
    if cache_dtype == FP8:
        kc, vc = to_fp8(kc), to_fp8(vc)
    q = torch.randn((len(lens), heads, d), generator=g).to(dtype)
    return q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


def check_decode() -> None:
    for cache_dtype in (torch.float32, FP8):
        for heads, kvh in ((4, 4), (6, 2)):
            lens = [1, 5, 33, 70, 129]
            q, kc, vc, bt, lens_t = paged_setup(1, lens, heads, kvh, 16, 4, torch.float32, cache_dtype)
            meta = AttentionMetadata(torch.empty(0, dtype=torch.long), len(lens), bt, lens_t, [], [], 4)
            ref = torch.empty_like(q)
            attention._decode_torch(ref, q, kc, vc, meta, 0.25)
            for splits in (1, 3, 8):
                out = torch.empty_like(q)
                triton_kernels.paged_decode(out, q, kc, vc, bt, lens_t, 4, 0.25, splits=splits)
                err = (out - ref).abs().max().item()
                assert err < 1e-4, (cache_dtype, heads, kvh, splits, err)
    print("decode ok")


def assert_fp8_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal, but for one quirk of Triton 3.9's interpreter (not the GPU): a value whose fp8 rounding
    carries into the next power of two is rounded to the power below instead (1.97 -> 1.0 where torch and
    the GPU give 2.0; the smallest subnormal -> 0)."""
    got, want = got.float(), want.float()
    off = got != want
    w, g = want[off], got[off]
    assert torch.equal(w.abs().log2().frac(), torch.zeros_like(w)), (g, w)  # only at powers of two
    assert bool(((g * 2 == w) | (g == 0)).all()), (g, w)
    assert off.sum() <= 0.05 * off.numel()


def check_rope_and_cache() -> None:
    g = torch.Generator().manual_seed(2)
    t, h, kvh, d = 5, 4, 2, 16
    for cache_dtype in (torch.float32, FP8):
        qkv = torch.randn((t, (h + 2 * kvh) * d), generator=g) * 3
        pos = torch.tensor([0, 3, 7, 100, 2047])
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        slots = torch.tensor([9, 2, 30, 17, 5])
        kc = torch.zeros((40, kvh, d)).to(cache_dtype)
        vc = torch.zeros((40, kvh, d)).to(cache_dtype)
        q, k, v = qkv.clone().split([h * d, kvh * d, kvh * d], dim=-1)
        ang = pos[:, None].float() * inv_freq[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        q_ref = apply_rope(q.reshape(t, h, d), cos, sin)
        k_ref = apply_rope(k.reshape(t, kvh, d), cos, sin)
        kc_ref, vc_ref = kc.clone(), vc.clone()
        attention.write_kv(kc_ref, vc_ref, k_ref, v.reshape(t, kvh, d), slots)
        triton_kernels.rope_and_cache(qkv, pos, inv_freq, kc, vc, slots, h, kvh, d)
        assert (qkv[:, : h * d].reshape(t, h, d) - q_ref).abs().max() < 1e-4
        if cache_dtype == FP8:
            assert_fp8_equal(kc, kc_ref)
            assert_fp8_equal(vc, vc_ref)
        else:
            assert (kc - kc_ref).abs().max() < 1e-4 and torch.equal(vc, vc_ref)
    print("rope ok")


def check_norm_and_silu() -> None:
    from worker.engine.model import RMSNorm

    g = torch.Generator().manual_seed(3)
    x, r = torch.randn((3, 96), generator=g), torch.randn((3, 96), generator=g)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.rand(96, generator=g) + 0.5
    out, new_r = triton_kernels.add_rmsnorm(x, r.clone(), norm.weight.data, 1e-6)
    assert (new_r - (x + r)).abs().max() < 1e-5 and (out - norm(x + r)).abs().max() < 1e-4
    gate_up = torch.randn((3, 2 * 80), generator=g)
    ref = torch.nn.functional.silu(gate_up[:, :80]) * gate_up[:, 80:]
    assert (triton_kernels.silu_mul(gate_up) - ref).abs().max() < 1e-5
    print("norm ok")


def check_gemv() -> None:
    """One-row products: rows not a multiple of the row block, K a multiple of the column tile and not."""
    g = torch.Generator().manual_seed(4)
    for n, k, block_k in ((37, 64, 32), (40, 100, 32), (5, 96, 128)):
        w, x = torch.randn((n, k), generator=g), torch.randn((1, k), generator=g)
        cfg = {"block_n": 2, "block_k": block_k, "num_warps": 4, "num_stages": 1}
        assert (triton_kernels.gemv(x, w, cfg) - x @ w.T).abs().max() < 1e-4, (n, k)
    print("gemv ok")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[f"check_{name}"]()

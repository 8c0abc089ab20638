"""The engine's Triton kernels checked on the CPU through Triton's interpreter (skipped where triton is
not installed). The GPU runs of the same kernels are in tests/gpu (device tool)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed "
                                "(the test extra installs it on Linux x86-64)")


def interpret(*checks: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.interpreted", *checks], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc.stdout


def test_paged_decode_with_and_without_splits_bf16_and_fp8_cache():
    assert "decode ok" in interpret("decode")


def test_rope_and_cache_write_bf16_and_fp8_cache():
    assert "rope ok" in interpret("rope_and_cache")


def test_fused_add_rmsnorm_and_silu_mul():
    assert "norm ok" in interpret("norm_and_silu")


def test_gemv_for_one_row_products():
    assert "gemv ok" in interpret("gemv")

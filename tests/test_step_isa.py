"""bench/step.py under instruction-set caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS): what an AVX2-only CPU runs, timed on an AVX-512 one. The caps are
named in the output and the bf16 row (emulated there, many times slower) is left out."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step  # noqa: E402


def test_caps_are_named_and_turn_off_the_bf16_row(monkeypatch):
    for k in step.ISA_CAPS:
        monkeypatch.delenv(k, raising=False)
    assert step.isa_caps() == ""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert step.isa_caps() == "ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2"
    assert step.cpu_bf16() is None


def test_torch_takes_the_capability_cap():
    """The cap the README's AVX2 figures rely on: torch reports (and dispatches to) AVX2 kernels."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "AVX2"

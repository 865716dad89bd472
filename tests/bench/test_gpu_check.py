"""bench/gpu_check.py without a GPU: it says so and exits 2 at once; its pure helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, python_env

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: run the check itself")
def test_without_a_gpu_it_exits_2_with_the_reason():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120, env=python_env())
    assert out.returncode == 2
    assert "needs an NVIDIA GPU and a CUDA build of torch" in out.stderr and torch.__version__ in out.stderr
    assert out.stdout == ""


def test_helpers():
    import gpu_check

    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.datasheet_peak("Some Future GPU") is None
    a, b = gpu_check.synthetic_examples(50), gpu_check.synthetic_examples(50)
    assert a == b and len(a) == 50 and all(set(e) == {"prompt", "completion"} for e in a)
    row = gpu_check._row("LoRA r16", "engine", {"tokens_per_s": 1000.0, "peak_bytes": 2 ** 31,
                                                "estimate_bytes": 2 ** 31 + 2 ** 29, "micro_batch_size": 8}, 1e6, 1e12)
    assert row["mfu"] == 0.001 and row["estimate_ratio"] == 1.25 and row["peak_gib"] == 2.0
    assert gpu_check._row("x", "trl", {"error": "Boom"}, 1, 1)["status"] == "FAILED Boom"

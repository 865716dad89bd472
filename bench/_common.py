"""Helpers shared by the bench/ scripts: paths, the machine, a matmul peak, tables, statistics.

Not a benchmark itself. Each script puts the repository root on ``sys.path`` and imports this module.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"
GSM8K = SHARED / "data" / "gsm8k_train.jsonl"
OUT = ROOT / "bench" / "out"
PYTHON = sys.executable

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def require(path: Path) -> None:
    """Exit with a clear message when a ../shared input is absent."""
    if not path.exists():
        sys.exit(f"{path} is absent: the benchmarks need ../shared (models/stories260K, data/gsm8k_train.jsonl)")


def gsm8k_examples(n: int, offset: int = 0) -> list[dict]:
    """GSM8K records ``offset`` .. ``offset + n - 1`` as prompt/completion (question + newline -> answer)."""
    out = []
    with open(GSM8K, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if len(out) == n:
                break
            if i >= offset:
                r = json.loads(line)
                out.append({"prompt": r["question"] + "\n", "completion": r["answer"]})
    return out


def gsm8k_jsonl(n: int, offset: int = 0) -> str:
    """:func:`gsm8k_examples` as JSONL text, one record per line."""
    return "".join(json.dumps(r) + "\n" for r in gsm8k_examples(n, offset))


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0-100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return float(s[k])


def machine() -> dict:
    """What the numbers were measured on: CPU model, cores, torch threads, memory, GPU."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def matmul_peak_gflops(n: int = 1024, repeats: int = 10, dtype=None, device: str = "cpu") -> float:
    """Best fp32 (or ``dtype``) matmul rate, GFLOP/s, of ``n x n`` by ``n x n`` on ``device``: the peak
    that MFU is measured against. The best of ``repeats`` (each timing several products)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    inner = 4
    best = 0.0
    for _ in range(repeats + 2):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * inner / (time.perf_counter() - t) / 1e9)
    return best


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns``: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, spec) if spec else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for k, line in enumerate(cells):
        print("  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def emit_json(data: dict, name: str) -> Path:
    """Print ``data`` as one JSON line and write it to ``bench/out/<name>.json``; returns that path."""
    OUT.mkdir(parents=True, exist_ok=True)
    line = json.dumps(data, default=str)
    print(line)
    path = OUT / f"{name}.json"
    path.write_text(line + "\n")
    return path


def peak_rss_mb() -> float:
    """This process's peak resident set size, MB (``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, *args: str) -> dict:
    """Run ``script`` (a bench file) again in a fresh Python process with ``args`` -- so its peak RSS is its
    own -- and return the JSON object on the last line it prints. Raises ``RuntimeError`` with its stderr
    when it fails."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([PYTHON, script, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])

"""Memory of validating a big JSON array (streamed with ijson): peak RSS against file size.

    .venv/bin/python bench/json_array_memory.py                   # 16 MB and 200 MB arrays, parsing and checks
    .venv/bin/python bench/json_array_memory.py --size-mb 1000    # a 1 GB array (~1 GB free disk in /tmp)
    .venv/bin/python bench/json_array_memory.py --tokenizer byte  # with token lengths (chat template: slow)

The files: the alpaca records of ../shared/data/llamafactory_alpaca_en_demo.json (each instruction numbered,
so none is identical), written as one JSON array in the demo's own layout (``json.dump(..., indent=2)``), up
to the size asked for; and, as the baseline of the same run, the same records as JSON Lines. Each file is
validated by :func:`core.validation.validate_file` in a fresh process, as the daemon does (every record
parsed, normalized and checked, the whole file hashed; with ``--tokenizer byte`` also measured with the
embedded hero's tokenizer and chat template in batches against ``max_length`` 512, which dominates the
time -- alpaca records are conversations -- so the default leaves it out: the question is memory).

Memory is flat when the peak RSS on the big array equals that on the small one: the table shows peak RSS
per file, the RSS after imports, and the growth per 100 MB of file. Prints a table and one JSON line (also
bench/out/json_array_memory.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, emit_json, machine, peak_rss_mb, print_table, require, run_child  # noqa: E402

ALPACA = SHARED / "data" / "llamafactory_alpaca_en_demo.json"
SMALL_MB = 16


def generate(path: Path, size_mb: int, as_array: bool) -> int:
    """Write about ``size_mb`` MB (10^6 bytes) of numbered alpaca records; returns the bytes written."""
    base = json.loads(ALPACA.read_text(encoding="utf-8"))
    target, written, i = size_mb * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        if as_array:
            f.write("[\n")
            written += 2
        while written < target:
            parts = []
            for r in base:
                record = {**r, "instruction": f"[{i}] {r['instruction']}"}
                if as_array:
                    body = json.dumps(record, indent=2, ensure_ascii=False).replace("\n", "\n  ")
                    parts.append(("  " if i == 0 else ",\n  ") + body)
                else:
                    parts.append(json.dumps(record, ensure_ascii=False) + "\n")
                i += 1
            text = "".join(parts)
            f.write(text)
            written += len(text.encode("utf-8"))
        if as_array:
            f.write("\n]\n")
            written += 3
    return written


def child(path: Path, tokenizer_name: str) -> None:
    """Validate ``path`` in this process and print one JSON line of measurements."""
    from core.config import HeroConfig, parse_config
    from core.validation import validate_file

    config = parse_config({"training": {"max_length": 512}})
    batch = None
    if tokenizer_name == "byte":
        from core.chat import measure_batch
        from core.hero import EMBEDDED_TOKENIZER, load_tokenizer

        tokenizer = load_tokenizer(EMBEDDED_TOKENIZER, HeroConfig())
        batch = lambda es: measure_batch(es, tokenizer, 512)  # noqa: E731
    baseline = peak_rss_mb()
    started = time.perf_counter()
    report = validate_file(path, config=config, count_tokens_batch=batch)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "bytes": report.size_bytes, "records": report.lines,
                      "accepted": report.accepted, "container": report.container, "format": report.format,
                      "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb()}))


def measure(path: Path, tokenizer_name: str) -> dict:
    return run_child(__file__, "--child", str(path), "--tokenizer", tokenizer_name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=200, help="size of the big array in MB (default 200)")
    p.add_argument("--tokenizer", choices=("byte", "none"), default="none")
    p.add_argument("--no-jsonl", action="store_true", help="skip the JSON Lines baseline of the big size")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.tokenizer)
        return 0
    require(ALPACA)
    work = Path(tempfile.mkdtemp(prefix="bench-json-array-"))
    rows = []
    try:
        files = [("json", SMALL_MB, work / "small.json"), ("json", a.size_mb, work / "big.json")]
        if not a.no_jsonl:
            files.append(("jsonl", a.size_mb, work / "big.jsonl"))
        for kind, size, path in files:
            generate(path, size, as_array=kind == "json")
            m = measure(path, a.tokenizer)
            path.unlink()
            rows.append({"file": f"{kind} {size} MB", "size_mb": round(m["bytes"] / 1e6, 1), "records": m["records"],
                         "container": m["container"], "accepted": m["accepted"], "seconds": round(m["seconds"], 1),
                         "mb_per_s": round(m["bytes"] / 1e6 / m["seconds"], 2),
                         "baseline_rss_mb": round(m["baseline_rss_mb"]), "peak_rss_mb": round(m["peak_rss_mb"])})
            print(f"  {rows[-1]['file']}: peak RSS {rows[-1]['peak_rss_mb']} MB, {rows[-1]['mb_per_s']} MB/s", flush=True)
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    print_table(rows, [("file", "file", ""), ("size_mb", "MB", ",.0f"), ("records", "records", ","),
                       ("container", "container", ""), ("seconds", "s", ".1f"), ("mb_per_s", "MB/s", ".1f"),
                       ("baseline_rss_mb", "RSS after imports MB", ""), ("peak_rss_mb", "peak RSS MB", "")])
    small, big = rows[0], rows[1]
    growth = (big["peak_rss_mb"] - small["peak_rss_mb"]) / max(big["size_mb"] - small["size_mb"], 1e-9) * 100
    summary = {"rss_growth_mb_per_100mb": round(growth, 2), "flat_memory": big["peak_rss_mb"] - small["peak_rss_mb"] <= 50,
               "peak_rss_vs_jsonl_mb": (big["peak_rss_mb"] - rows[2]["peak_rss_mb"]) if len(rows) > 2 else None}
    print(f"peak RSS grows {growth:.2f} MB per 100 MB of JSON array (flat: {summary['flat_memory']})")
    emit_json({"bench": "json_array_memory", "machine": machine(), "tokenizer": a.tokenizer, "results": rows,
               "summary": summary}, "json_array_memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())

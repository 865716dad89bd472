"""Validation speed and memory: MB/s, records/s (token lengths included) and peak RSS on a generated file.

    .venv/bin/python bench/validation_speed.py                 # a 1 GB file (~4 GB free disk in /tmp)
    .venv/bin/python bench/validation_speed.py --quick         # a 64 MB file
    .venv/bin/python bench/validation_speed.py --size-mb 256 --tokenizers stories260K

The file: GSM8K records from ../shared/data as ``prompt``/``completion`` JSON lines, repeated (each line
numbered so none is identical) up to the size asked for. Each measurement runs
:func:`core.validation.validate_file` in a fresh process, as the daemon does: every line parsed and
checked, the whole file hashed, token lengths measured with the hero's tokenizer in batches
(:func:`core.chat.measure_batch`, as the daemon does) against ``max_length`` 512. Tokenizers: ``byte`` (the embedded
default hero's byte-level tokenizer) and ``stories260K`` (a real 512-token BPE vocabulary).

Memory is flat when the peak RSS on the big file equals that on a small one (16 MB): both are reported,
with the RSS after imports (the baseline).

Prints a table and one JSON line (also bench/out/validation_speed.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    GSM8K,
    ROOT,
    STORIES260K,
    emit_json,
    machine,
    peak_rss_mb,
    print_table,
    require,  # noqa: E402
    run_child,
)

SMALL_MB = 16


def generate(path: Path, size_mb: int) -> int:
    """Write ``size_mb`` MB (10^6 bytes) of numbered GSM8K prompt/completion lines; returns the bytes."""
    base = [json.loads(line) for line in open(GSM8K, encoding="utf-8")]
    target = size_mb * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        i = 0
        while written < target:
            chunk = []
            for r in base:
                chunk.append(json.dumps({"prompt": f"[{i}] {r['question']}\n", "completion": r["answer"]}) + "\n")
                i += 1
            text = "".join(chunk)
            f.write(text)
            written += len(text.encode("utf-8"))
    return written


def child(path: Path, tokenizer_name: str) -> None:
    """Validate ``path`` in this process and print one JSON line of measurements."""
    sys.path.insert(0, str(ROOT))
    from core.chat import count_tokens, measure_batch
    from core.config import HeroConfig, parse_config
    from core.hero import EMBEDDED_TOKENIZER, load_tokenizer
    from core.validation import validate_file

    source = EMBEDDED_TOKENIZER if tokenizer_name == "byte" else str(STORIES260K)
    tokenizer = load_tokenizer(source, HeroConfig())
    config = parse_config({"training": {"max_length": 512}})
    baseline = peak_rss_mb()
    started = time.perf_counter()
    report = validate_file(path, config=config, count_tokens=lambda e: count_tokens(e, tokenizer),
                           count_tokens_batch=lambda es: measure_batch(es, tokenizer, 512))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "bytes": report.size_bytes, "lines": report.lines,
                      "accepted": report.accepted, "tokens": report.tokens.model_dump() if report.tokens else None,
                      "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb()}))


def measure(path: Path, tokenizer_name: str) -> dict:
    return run_child(__file__, "--child", str(path), "--tokenizers", tokenizer_name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 64 MB file instead of 1 GB")
    p.add_argument("--size-mb", type=int, help="size of the big file in MB (default 1000, quick 64)")
    p.add_argument("--tokenizers", default="byte,stories260K", help="comma-separated: byte, stories260K")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.tokenizers)
        return 0
    require(GSM8K)
    size_mb = a.size_mb or (64 if a.quick else 1000)
    work = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    rows = []
    try:
        small, big = work / "small.jsonl", work / "big.jsonl"
        generate(small, SMALL_MB)
        t = time.perf_counter()
        generate(big, size_mb)
        print(f"generated {big.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
        for name in a.tokenizers.split(","):
            if name == "stories260K":
                require(STORIES260K)
            s = measure(small, name)
            b = measure(big, name)
            rows.append({"tokenizer": name, "size_mb": round(b["bytes"] / 1e6, 1), "lines": b["lines"],
                         "seconds": round(b["seconds"], 2), "mb_per_s": round(b["bytes"] / 1e6 / b["seconds"], 2),
                         "records_per_s": round(b["lines"] / b["seconds"]), "tokens_p50": b["tokens"]["p50"],
                         "tokens_max": b["tokens"]["max"], "baseline_rss_mb": round(b["baseline_rss_mb"]),
                         "peak_rss_small_mb": round(s["peak_rss_mb"]), "peak_rss_mb": round(b["peak_rss_mb"]),
                         "accepted": b["accepted"]})
            print(f"  {name}: {rows[-1]['mb_per_s']} MB/s", flush=True)
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    print_table(rows, [("tokenizer", "tokenizer", ""), ("size_mb", "MB", ",.0f"), ("lines", "records", ","),
                       ("seconds", "s", ".1f"), ("mb_per_s", "MB/s", ".1f"), ("records_per_s", "records/s", ","),
                       ("tokens_p50", "tokens p50", ""), ("baseline_rss_mb", "RSS base MB", ""),
                       ("peak_rss_small_mb", f"peak RSS {SMALL_MB} MB file", ""),
                       ("peak_rss_mb", "peak RSS big file", "")])
    targets = {r["tokenizer"]: {"mb_per_s": r["mb_per_s"], "target": 10.0, "met": r["mb_per_s"] >= 10.0,
                                "flat_memory": r["peak_rss_mb"] - r["peak_rss_small_mb"] <= 50} for r in rows}
    emit_json({"bench": "validation_speed", "machine": machine(), "results": rows, "targets": targets},
              "validation_speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How faithful GGUF exports are: next-token logits of each quantization against the checkpoint.

    .venv/bin/python bench/export_fidelity.py                  # stories260K (Llama) and the nano hero (Qwen3)
    .venv/bin/python bench/export_fidelity.py --llama-logits ./llama_logits   # also as llama.cpp reads them

Each hero trains one short quest in a temporary realm (the daemon, until idle); its latest checkpoint is
exported with ``management.export.export_checkpoint`` as GGUF in every quantization and read back by
transformers (``from_pretrained(..., gguf_file=)``) and, with ``--llama-logits`` (built from
``bench/llama_logits.cpp``), by llama.cpp itself, which also tokenizes the prompts (compared with the hero's
tokenizer). Reported: file size, max |logit difference| at the last position over three chat prompts,
top-1 agreement. Prints a table and one JSON line (also bench/out/export_fidelity.json).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import STORIES260K, emit_json, machine, print_table  # noqa: E402

from core.exports import QUANTIZATIONS  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "Tell me a story about Lily and the red ball."},
     {"role": "assistant", "content": "Once upon a time, Lily found a ball."},
     {"role": "user", "content": "What happened next?"}],
    [{"role": "user", "content": "Once upon a time"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Tom? é 🐉"}],
]


def llama(binary: str, gguf_file: Path, mode: str, text: str, scratch: Path) -> tuple[list[int], list[float]]:
    (scratch / "in.txt").write_text(text, encoding="utf-8")
    out = subprocess.run([binary, str(gguf_file), mode, str(scratch / "in.txt")], capture_output=True, text=True,
                         check=True, timeout=300)
    ids, logits = out.stdout.splitlines()[:2]
    return [int(x) for x in ids.split()], [float(x) for x in logits.split()]


def measure(name: str, realm_root: Path, base_model, llama_binary: str | None) -> list[dict]:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.ledger import Ledger
    from management.export import export_checkpoint
    from management.export_model import load_for_export, resolve_source
    from tests.trained import trained_realm

    realm = trained_realm(realm_root, base_model=base_model)
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    source = resolve_source(realm, config, ledger, "latest")
    model, tokenizer, _ = load_for_export(source, realm, config)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    with torch.no_grad():
        refs = [model(torch.tensor([i])).logits[0, -1].numpy() for i in ids]
    rows = []
    for q in QUANTIZATIONS:
        result = export_checkpoint(realm, config, ledger, "latest", "gguf", q, realm_root.parent / f"{name}-{q}")
        cfg = AutoConfig.from_pretrained(result.folder, gguf_file=result.path.name)
        cfg.head_dim = model.config.head_dim  # transformers' qwen3 GGUF mapping ignores attention.key_length
        back = AutoModelForCausalLM.from_pretrained(result.folder, gguf_file=result.path.name, config=cfg,
                                                    dtype=torch.float32).eval()
        row = {"hero": name, "quantization": q, "bytes": result.path.stat().st_size, "tf_max_diff": 0.0,
               "tf_top1": 0, "logit_range": max(float(np.abs(r).max()) for r in refs)}
        for i, ref in zip(ids, refs, strict=True):
            with torch.no_grad():
                got = back(torch.tensor([i])).logits[0, -1].numpy()
            row["tf_max_diff"] = max(row["tf_max_diff"], float(np.abs(got - ref).max()))
            row["tf_top1"] += int(got.argmax() == ref.argmax())
        if llama_binary:
            scratch = Path(tempfile.mkdtemp())
            row.update(llama_max_diff=0.0, llama_top1=0, llama_same_tokens=0)
            for t, i, ref in zip(texts, ids, refs, strict=True):
                got_ids, _ = llama(llama_binary, result.path, "text", t, scratch)
                row["llama_same_tokens"] += int(got_ids == i)
                _, logits = llama(llama_binary, result.path, "ids", " ".join(map(str, i)), scratch)
                got = np.array(logits)[:len(ref)]
                row["llama_max_diff"] = max(row["llama_max_diff"], float(np.abs(got - ref).max()))
                row["llama_top1"] += int(got.argmax() == ref.argmax())
        rows.append(row)
    ledger.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-logits", help="the llama_logits binary built from bench/llama_logits.cpp")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export-fidelity-"))
    rows = []
    if STORIES260K.exists():
        rows += measure("stories260K", work / "stories" / "realm", STORIES260K, args.llama_logits)
    rows += measure("nano", work / "nano" / "realm", None, args.llama_logits)
    columns = [("hero", "hero", ""), ("quantization", "quant", ""), ("bytes", "bytes", ",d"),
               ("tf_max_diff", "max |d| transformers", ".2e"), ("tf_top1", "top-1 same", "d")]
    if args.llama_logits:
        columns += [("llama_max_diff", "max |d| llama.cpp", ".2e"), ("llama_top1", "top-1 same", "d"),
                    ("llama_same_tokens", "same tokens", "d")]
    print_table(rows, columns)
    emit_json({"machine": machine(), "prompts": len(PROMPTS), "rows": rows}, "export_fidelity")


if __name__ == "__main__":
    main()

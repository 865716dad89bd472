"""Cut the real public data in ../shared into quests for a realm's inbox (read in place, never copied
into the repository).

    python scripts/shared_quests.py INBOX [--shakespeare-chars N] [--gsm8k-lines N] [--quests K]

- tiny Shakespeare -> K ``text`` quests (``shakespeare_1.jsonl`` ...), one record per block of lines;
- GSM8K -> ``gsm8k_train.jsonl`` (``question``/``answer``: the realm maps them to prompt/completion
  with ``validation.field_map``);
- hh-rlhf harmless-base -> ``hh_rlhf_harmless.jsonl.gz`` (implicit-prompt preference pairs: waits for DPO).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
GSM8K_FIELD_MAP = {"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}}
LINES_PER_RECORD = 12


def shakespeare_records(chars: int | None = None) -> list[str]:
    text = (SHARED_DATA / "tinyshakespeare_input.txt").read_text(encoding="utf-8")
    lines = text[:chars].splitlines() if chars else text.splitlines()
    return ["\n".join(lines[i:i + LINES_PER_RECORD]).strip() for i in range(0, len(lines), LINES_PER_RECORD)
            if "\n".join(lines[i:i + LINES_PER_RECORD]).strip()]


def write_shared_quests(inbox: Path, *, shakespeare_chars: int | None = None, gsm8k_lines: int | None = None,
                        quests: int = 3, hh_rlhf: bool = True) -> list[Path]:
    """Write the quests into ``inbox`` (each through a temporary name, then renamed). Returns their paths."""
    inbox.mkdir(parents=True, exist_ok=True)
    written = []
    records = shakespeare_records(shakespeare_chars)
    size = -(-len(records) // quests)
    for k in range(quests):
        chunk = records[k * size:(k + 1) * size]
        written.append(_write(inbox / f"shakespeare_{k + 1}.jsonl",
                              "".join(json.dumps({"text": r}) + "\n" for r in chunk).encode()))
    with open(SHARED_DATA / "gsm8k_train.jsonl", "rb") as f:
        data = b"".join(line for i, line in enumerate(f) if gsm8k_lines is None or i < gsm8k_lines)
    written.append(_write(inbox / "gsm8k_train.jsonl", data))
    if hh_rlhf:
        tmp = inbox / ".hh_rlhf_harmless.jsonl.gz.part"
        shutil.copyfile(SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz", tmp)
        tmp.rename(inbox / "hh_rlhf_harmless.jsonl.gz")
        written.append(inbox / "hh_rlhf_harmless.jsonl.gz")
    return written


def _write(path: Path, data: bytes) -> Path:
    tmp = path.with_name("." + path.name + ".part")
    tmp.write_bytes(data)
    tmp.rename(path)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inbox", type=Path)
    p.add_argument("--shakespeare-chars", type=int)
    p.add_argument("--gsm8k-lines", type=int)
    p.add_argument("--quests", type=int, default=3)
    a = p.parse_args()
    for path in write_shared_quests(a.inbox, shakespeare_chars=a.shakespeare_chars, gsm8k_lines=a.gsm8k_lines,
                                    quests=a.quests):
        print(path)

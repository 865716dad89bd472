"""What a promotion trial costs: 50 items, greedy, on the embedded default heroes and stories260K.

    .venv/bin/python bench/skills_trial.py                 # nano, micro (newborn) and stories260K
    .venv/bin/python bench/skills_trial.py --threads 1     # torch.set_num_threads(1)
    .venv/bin/python bench/skills_trial.py --checkpoint DIR   # also a trained checkpoint (e.g. of skills_learnability)

For each model: the load time (what ``python -m training trial`` adds), then the median of ``--repeats``
50-item trials (:func:`core.skills.trials.run_trial`, batch 64) at BIN levels 0, 3 and 7 and LETTERS level
2. A newborn hero never emits its end-of-turn marker, so it writes the whole budget (the longest reference
answer + 8 tokens): the worst case; a trained hero stops after its answer. Prints a table and one JSON line
(also bench/out/skills_trial.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import STORIES260K, emit_json, machine, median, print_table  # noqa: E402

from core.config import HeroConfig  # noqa: E402
from core.skills.binary import BinarySkill  # noqa: E402
from core.skills.letters import LettersSkill  # noqa: E402
from core.skills.trials import run_trial  # noqa: E402

CASES = ((BinarySkill(), 0), (BinarySkill(), 3), (BinarySkill(), 7), (LettersSkill(), 2))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", action="append", default=[], help="a trained model folder to time too")
    a = p.parse_args()
    import torch

    from core.hero import create_default_hero, load_model, load_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="trial-bench-"))
    models = {f"{size} (newborn)": create_default_hero(tmp / size, size) for size in ("nano", "micro")}
    if STORIES260K.exists():
        models["stories260K"] = STORIES260K
    models.update({Path(c).name: Path(c) for c in a.checkpoint})
    rows = []
    for name, folder in models.items():
        t = time.perf_counter()
        model, tokenizer = load_model(folder, HeroConfig()), load_tokenizer(folder, HeroConfig())
        load = time.perf_counter() - t
        for skill, level in CASES:
            times, result = [], None
            for r in range(a.repeats):
                result = run_trial(model, tokenizer, skill, level, n=50, seed=r)
                times.append(result.duration_seconds)
            rows.append({"model": name, "load_seconds": load, "skill": f"{skill.name} L{level}",
                         "trial_seconds": median(times), "correct": result.correct,
                         "answer_chars": max(len(x) for x in result.answers)})
            print_table(rows[-1:], [(k, k, ".2f" if "seconds" in k else "") for k in rows[-1]])
    print()
    print_table(rows, [("model", "model", ""), ("load_seconds", "load s", ".2f"), ("skill", "skill", ""),
                       ("trial_seconds", "50-item trial s (median)", ".2f"), ("correct", "right", ""),
                       ("answer_chars", "longest answer", "")])
    emit_json({"machine": machine(), "threads": a.threads, "repeats": a.repeats, "rows": rows}, "skills_trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for the benches that compare schools on the same text: one quest trained by the real engine in a
fresh realm, and per-token held-out measurements of a model folder. Not a benchmark itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

from _common import ROOT  # noqa: F401 - puts the repository root on sys.path


def train_quest(work: Path, name: str, base_model: Path, rule: dict, texts: list[str], training: dict) -> dict:
    """Train the ``text`` records ``texts`` as one quest named ``quest.jsonl`` with the ``schools`` rule
    ``rule`` in a new realm ``work/name`` whose hero starts from ``base_model``, through
    :meth:`core.engine.Engine.train_quest`. Returns ``{"checkpoint", "steps", "seconds", "loss"}``."""
    from core.engine import Engine
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue
    from core.realm import init_realm

    realm = init_realm(work / name, overrides={"hero": {"base_model": str(base_model)},
                                               "training": training, "schools": {"quest*.jsonl": rule}})
    ledger = Ledger(realm.ledger_path)
    records = [(i + 1, {"text": t}) for i, t in enumerate(texts)]
    path = work / f"{name}-data" / "quest.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for _, r in records), encoding="utf-8")
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    ledger.update_quest(qid, format="text", school=rule.get("school", "sft"))
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    started = time.perf_counter()
    result = engine.train_quest(qid, records)
    seconds = time.perf_counter() - started
    engine.cleanup()
    ledger.close()
    return {"checkpoint": result.checkpoint, "steps": result.steps, "seconds": round(seconds, 1),
            "loss": result.loss}


def heldout(model_dir: Path | str, texts: list[str], tokenizer, max_length: int, teacher=None) -> dict:
    """Per-token means over the loss-carrying tokens of ``texts`` (tokenized as the engine does, truncated
    to ``max_length``): ``ce`` (nats) of the model in ``model_dir`` and, with a ``teacher`` model,
    ``kl`` = KL(teacher || model) at temperature 1 (nats). fp32, one text per forward pass, no grad."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from core.chat import IGNORE_INDEX, tokenize_example
    from core.schools.whisper import forward_kl

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    ce = kl = 0.0
    n = 0
    with torch.no_grad():
        for i, text in enumerate(texts):
            ex = tokenize_example({"text": text}, tokenizer, max_length, i)
            ids = torch.tensor([ex.input_ids])
            targets = torch.tensor(ex.labels[1:] + [IGNORE_INDEX])
            keep = targets != IGNORE_INDEX
            logits = model(input_ids=ids).logits[0][keep]
            ce += F.cross_entropy(logits, targets[keep], reduction="sum").item()
            if teacher is not None:
                kl += forward_kl(logits, teacher(input_ids=ids).logits[0][keep]).sum().item()
            n += int(keep.sum())
    out = {"ce": ce / n, "tokens": n}
    if teacher is not None:
        out["kl"] = kl / n
    return out

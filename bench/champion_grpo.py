"""Champion (GRPO): our steps against TRL's ``GRPOTrainer`` in the same run, and "Champion learns" on BIN.

    .venv/bin/python bench/champion_grpo.py speed                 # stories260K, 4 prompts x G 4, 16 new tokens
    .venv/bin/python bench/champion_grpo.py speed --steps 12 --prompts-per-step 4 --num-generations 8
    .venv/bin/python bench/champion_grpo.py learns                # nano hero: SFT warm-up, GRPO stage on BIN

**speed**: the same model (``../shared/models/stories260K``, fp32, CPU), the same prompts (story openings), the
same group size G, prompts per step, completion length (``max_completion_length``; both stop at EOS), learning
rate, ``beta`` 0 and TRL's default loss (``dapo``), the same reward (:func:`core.rewards.regex_format`: the
completion mentions a name). Ours: :class:`core.engine.Engine` training a ``grpo`` quest; TRL: ``GRPOTrainer``
(``per_device_train_batch_size`` = prompts x G, ``bf16``/gradient checkpointing off). Time per optimizer step
= median of the intervals between consecutive steps (the first step and setup excluded on both sides; ours from
the ledger's step times, TRL's from a callback). Prints the ratio TRL / ours (> 1: ours faster).

**learns**: the embedded ``nano`` hero (as the README's sparring measurement). The distinct prompts of BIN level
``--level`` (sums; level 1: 16 prompts) are split by a fixed seed into ``--held-out`` held-out prompts and the
train prompts. Warm-up: SFT on ``--warmup`` items of the lower levels and ``--warmup-level`` items over all the
level's prompts (learning rate ``--lr``); then a GRPO stage on the train prompts only
(reward: BIN's scorer, the record's ``skill``; learning rate ``--grpo-lr``). Before and after the GRPO stage, on the held-out prompts (never sampled by GRPO):
the mean reward of ``--eval-samples`` sampled completions per prompt (temperature 1, fixed seeds) and the
greedy accuracy. JSON lines also in ``bench/out/champion_grpo_<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import STORIES260K, emit_json, machine, require  # noqa: E402

from core.engine import Engine  # noqa: E402
from core.ledger import Ledger  # noqa: E402
from core.quest_queue import QuestQueue  # noqa: E402
from core.realm import init_realm  # noqa: E402
from core.rewards import regex_format  # noqa: E402

NAME_PATTERN = r"\b(Lily|Tom|Tim|Sue|Ben|Max|Mia|Sam|Anna|Jack)\b"
OPENINGS = ["Once upon a time, there was a", "One day, a little", "The sun was shining and", "In a small town,",
            "Lily and Tom went to the", "There was a big dog named", "A little bird wanted to", "Mom said to"]


def _quest(realm, records: list[dict], name: str, fmt: str, school: str) -> tuple[Ledger, int, list]:
    ledger = Ledger(realm.ledger_path)
    path = realm.root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    ledger.update_quest(qid, format=fmt, school=school)
    return ledger, qid, [(i + 1, r) for i, r in enumerate(records)]


def _train(realm, records, name, fmt, school) -> tuple[list[dict], float]:
    ledger, qid, numbered = _quest(realm, records, name, fmt, school)
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    started = time.perf_counter()
    engine.train_quest(qid, numbered)
    seconds = time.perf_counter() - started
    engine.cleanup()
    steps = ledger.steps()
    ledger.close()
    return steps, seconds


def speed(a) -> dict:
    require(STORIES260K)
    rng = random.Random(0)
    prompts = [rng.choice(OPENINGS) for _ in range(a.prompts_per_step * a.steps)]
    work = Path(tempfile.mkdtemp(prefix="champion-speed-"))
    realm = init_realm(work / "realm", overrides={
        "hero": {"base_model": str(STORIES260K)},
        "training": {"learning_rate": a.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
                     "micro_batch_size": a.prompts_per_step, "gradient_accumulation_steps": 1, "max_length": 256,
                     "eval_holdout_every": 0, "save_steps": 1_000_000, "save_interval_minutes": 1e6},
        "schools": {"*.jsonl": {"school": "grpo", "num_generations": a.num_generations,
                                "max_completion_length": a.max_completion_length,
                                "rewards": {"regex_format": {"weight": 1.0, "pattern": NAME_PATTERN, "mode": "search"}}}},
        "idle_generation": {"enabled": False}})
    steps, ours_total = _train(realm, [{"prompt": p} for p in prompts], "stories.jsonl", "prompt_only", "grpo")
    ours = statistics.median(b["time"] - a_["time"] for a_, b in zip(steps, steps[1:], strict=False))
    trl_step, trl_total = _trl(prompts, a, work)
    out = {"bench": "champion_grpo_speed", "model": "stories260K", "steps": a.steps,
           "prompts_per_step": a.prompts_per_step, "num_generations": a.num_generations,
           "max_completion_length": a.max_completion_length, "ours_seconds_per_step": round(ours, 4),
           "trl_seconds_per_step": round(trl_step, 4), "ratio_trl_over_ours": round(trl_step / ours, 2),
           "ours_total_seconds": round(ours_total, 2), "trl_total_seconds": round(trl_total, 2),
           "machine": machine()}
    print(f"GRPO step (median, {a.prompts_per_step} prompts x G {a.num_generations}, {a.max_completion_length} "
          f"new tokens): ours {ours:.3f} s, TRL GRPOTrainer {trl_step:.3f} s -> TRL / ours = {trl_step / ours:.2f}x")
    return out


def _trl(prompts: list[str], a, work: Path) -> tuple[float, float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def names(prompts, completions, **_):
        return [regex_format(p, c, pattern=NAME_PATTERN, mode="search") for p, c in zip(prompts, completions,
                                                                                          strict=True)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    config = GRPOConfig(output_dir=str(work / "trl"), learning_rate=a.lr, lr_scheduler_type="constant",
                        warmup_steps=0, per_device_train_batch_size=a.prompts_per_step * a.num_generations,
                        gradient_accumulation_steps=1, num_generations=a.num_generations,
                        max_completion_length=a.max_completion_length, max_steps=a.steps, beta=0.0,
                        temperature=1.0, save_strategy="no", report_to=[], logging_steps=1, use_cpu=True,
                        bf16=False, fp16=False, gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=names, args=config,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer, callbacks=[Clock()])
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    return statistics.median(b - a_ for a_, b in zip(times, times[1:], strict=False)), total


def learns(a) -> dict:
    import torch

    from core.schools.sampling import generating, sample_group, stop_token_ids
    from core.skills.binary import BinarySkill
    from core.skills.quests import mixed_items, prompt_record, quest_record
    from core.skills.trials import generation_prompt

    skill = BinarySkill()
    top = 1 << (a.level + 1)
    prompts = sorted({f"{x:b}+{y:b}" for x in range(top) for y in range(top)})
    random.Random(7).shuffle(prompts)
    held, train = set(prompts[:a.held_out]), prompts[a.held_out:]
    from core.skills.base import SkillItem

    def item(p: str) -> SkillItem:
        x, y = (int(t, 2) for t in p.split("+"))
        return SkillItem("BIN", a.level, p, f"{x + y:b}")

    work = Path(tempfile.mkdtemp(prefix="champion-learns-"))
    realm = init_realm(work / "realm", overrides={
        "hero": {"default_size": "nano"},
        "training": {"max_length": 64, "micro_batch_size": 8, "warmup_steps": 0, "learning_rate": a.lr,
                     "eval_steps": 0, "eval_holdout_every": 0, "save_steps": 1_000_000,
                     "save_interval_minutes": 1e6},
        "skills": {"trial_every_steps": 0}, "idle_generation": {"enabled": False},
        "schools": {"grpo*.jsonl": {"school": "grpo", "num_generations": a.num_generations,
                                    "max_completion_length": 8, "temperature": 1.0}}})
    rng = random.Random(1)
    warm = mixed_items(skill, list(range(a.level)), a.warmup, "warm") + \
        [item(rng.choice(prompts)) for _ in range(a.warmup_level)]
    rng.shuffle(warm)
    _, warm_seconds = _train(realm, [quest_record(it) for it in warm], "warmup.jsonl", "prompt_completion", "sft")

    def measure() -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from core.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(realm.checkpoints_dir(realm.load_config().hero.name))
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(ckpt)
        stops = stop_token_ids(tok)
        sampled, greedy = [], []
        with generating(model):
            for k, p in enumerate(sorted(held)):
                it = item(p)
                ids = tok(generation_prompt(tok, it), add_special_tokens=False)["input_ids"]
                for grp, sample in ((sampled, True), (greedy, False)):
                    outs = sample_group(model, ids, a.eval_samples if sample else 1, max_new_tokens=8,
                                        temperature=1.0, seed=1000 + k, stops=stops, pad_token_id=tok.pad_token_id,
                                        do_sample=sample)
                    for out, _ in outs:
                        text = tok.decode([t for t in out if t not in stops], skip_special_tokens=True)
                        grp.append(float(skill.score(text, it.answer)))
        return {"sampled_mean_reward": round(sum(sampled) / len(sampled), 4),
                "greedy_accuracy": round(sum(greedy) / len(greedy), 4)}

    before = measure()
    records = [prompt_record(item(rng.choice(train))) for _ in range(a.grpo_prompts)]
    config = json.loads(realm.config_path.read_text())
    config["training"]["learning_rate"] = a.grpo_lr
    realm.config_path.write_text(json.dumps(config))
    steps, grpo_seconds = _train(realm, records, "grpo-bin.jsonl", "prompt_only", "grpo")
    steps = [s for s in steps if s["quest_id"] == steps[-1]["quest_id"]]  # the GRPO quest's
    after = measure()
    ledger = Ledger(realm.ledger_path)
    rewards = [m.get("reward") for _, m in sorted(ledger.step_metrics().items())]
    ledger.close()
    first, last = rewards[:5], rewards[-5:]
    out = {"bench": "champion_grpo_learns", "hero": "nano", "level": a.level, "warmup_items": len(warm),
           "warmup_seconds": round(warm_seconds, 1), "grpo_steps": len(steps), "grpo_prompts": a.grpo_prompts,
           "num_generations": a.num_generations, "grpo_seconds": round(grpo_seconds, 1), "warmup_lr": a.lr, "grpo_lr": a.grpo_lr,
           "train_reward_first5": round(sum(first) / len(first), 4), "train_reward_last5": round(sum(last) / len(last), 4),
           "held_out_prompts": len(held), "eval_samples": a.eval_samples, "before": before, "after": after,
           "machine": machine()}
    print(f"held-out BIN level-{a.level} prompts ({len(held)}, never sampled by GRPO): sampled mean reward "
          f"{before['sampled_mean_reward']:.3f} -> {after['sampled_mean_reward']:.3f}, greedy accuracy "
          f"{before['greedy_accuracy']:.3f} -> {after['greedy_accuracy']:.3f} over {len(steps)} GRPO steps "
          f"(train reward {out['train_reward_first5']:.3f} -> {out['train_reward_last5']:.3f})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["speed", "learns"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=None, help="G (speed: 4, learns: 8)")
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="speed: 1e-4, learns: 1e-3 (warm-up SFT)")
    p.add_argument("--grpo-lr", type=float, default=3e-4, help="learns: learning rate of the GRPO stage")
    p.add_argument("--warmup", type=int, default=600, help="learns: warm-up SFT items of the lower levels")
    p.add_argument("--level", type=int, default=1, help="learns: the BIN level of the GRPO stage (0-3: sums)")
    p.add_argument("--held-out", type=int, default=4, help="learns: prompts of the level the GRPO stage never sees")
    p.add_argument("--warmup-level", type=int, default=300, help="learns: warm-up SFT items over all the level's "
                   "prompts")
    p.add_argument("--grpo-prompts", type=int, default=240, help="learns: prompts of the GRPO stage (8 per step)")
    p.add_argument("--eval-samples", type=int, default=64)
    a = p.parse_args()
    if a.mode == "speed":
        a.num_generations, a.lr = a.num_generations or 4, a.lr or 1e-4
        out = speed(a)
    else:
        a.num_generations, a.lr = a.num_generations or 8, a.lr or 1e-3
        out = learns(a)
    emit_json(out, f"champion_grpo_{a.mode}")


if __name__ == "__main__":
    main()

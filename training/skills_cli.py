"""``python -m training trial SKILL``, ``python -m training spar SKILL`` and ``python -m training skills
list|quest``: promotion trials and sparring rounds on demand, the realm's skills with their levels, and
skill quests written into the inbox.

Exit codes (:class:`training.cli.ExitCode`): 0 done, 2 a level the skill does not have, 5 no such skill
or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.checkpoint_layout import EXAMPLE_NAME
from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm

OK, USAGE, NOT_FOUND = 0, 2, 5


def add_parsers(sub) -> None:
    """Register ``trial``, ``spar`` and ``skills`` on the CLI's subparsers."""
    s = sub.add_parser("trial", help="promotion trial: the hero answers fresh items of a skill at its level "
                       "(greedy); promoted when the Wilson 95%% lower bound reaches skills.promotion_threshold")
    s.add_argument("skill")
    s.add_argument("--checkpoint", default="latest", help=f"checkpoint ({EXAMPLE_NAME} or its global step), "
                   "'latest' or 'base'")
    s.add_argument("--level", type=int, help="try this level instead of the skill's current one (measures "
                   "only: promotion needs the current level)")
    s.add_argument("--samples", type=int, help="items (default skills.trial_samples; at least 30)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("spar", help="sparring (the Mirror): the hero answers items of a skill at its level "
                       "(greedy); each wrong answer becomes a correction example in a quest queued at high priority")
    s.add_argument("skill")
    s.add_argument("--checkpoint", default="latest", help=f"checkpoint ({EXAMPLE_NAME} or its global step), "
                   "'latest' or 'base'")
    s.add_argument("--level", type=int, help="spar at this level instead of the skill's current one")
    s.add_argument("--count", type=int, help="items (default sparring.samples)")
    s.add_argument("--feedback-turn", action=argparse.BooleanOptionalAction, default=None,
                   help="show the wrong answer in the correction (default sparring.feedback_turn)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("skills", help="the realm's skills and levels; write skill quests into the inbox")
    skills = s.add_subparsers(dest="skills_command", required=True, metavar="skills-command")
    v = skills.add_parser("list", help="skills, levels, trials, and skills that failed to load")
    v.add_argument("--json", action="store_true")
    v = skills.add_parser("quest", help="write a quest of a skill's training items into the inbox (or --out)")
    v.add_argument("skill")
    v.add_argument("--level", type=int, action="append", help="level(s) to draw from (repeat to mix; "
                   "default the skill's current level)")
    v.add_argument("--count", type=int, default=1000, help="items (default 1000)")
    v.add_argument("--key", help="seed key: the same key gives the same items (default: the time)")
    v.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    v.add_argument("--out", help="write this file instead of into the inbox")


def _registry(realm: Realm, config: RealmConfig, ledger: Ledger):
    from core.skills.registry import build_registry, report_errors

    registry = build_registry(realm.root, config.skills)
    report_errors(ledger, registry)
    for e in registry.errors:
        print(f"warning: skill {e.source}: {e.message.strip().splitlines()[-1]}", file=sys.stderr)
    return registry


def _model_dir(realm: Realm, config: RealmConfig, name: str) -> tuple[Path, int]:
    """The model folder of ``name`` (``latest``, ``base``, a checkpoint name or a global step) and its step.
    Raises ``FileNotFoundError`` naming what is missing."""
    from core.checkpoint_layout import latest_checkpoint, list_checkpoints, parse_step_argument, step_of
    from core.hero import resolve_model_source

    if name == "base":  # the newborn default hero is created as the daemon would (same seed)
        return Path(resolve_model_source(realm, config.hero, seed=config.training.seed)[0]), 0
    folder = realm.checkpoints_dir(config.hero.name)
    if name == "latest":
        path = latest_checkpoint(folder)
        if path is None:
            raise FileNotFoundError("no checkpoint yet (use --checkpoint base)")
        return path, step_of(path)
    try:
        step = parse_step_argument(name)
    except ValueError as exc:
        raise FileNotFoundError(f"{exc}; or 'latest', 'base'") from None
    matches = [p for p in list_checkpoints(folder) if step_of(p) == step]
    if not matches:
        raise FileNotFoundError(f"no checkpoint of global step {step} in {folder}")
    return matches[0], step


def _target(args, realm: Realm, config: RealmConfig, ledger: Ledger, mastered_hint: str):
    """What ``trial`` and ``spar`` answer on: ``(skill, current level, level, checkpoint folder, global step, model,
    tokenizer)``, or the exit code after printing why not (unknown skill, mastered without ``--level``, a level out
    of range, a checkpoint that cannot be loaded)."""
    from core.hero import HeroError, load_model, load_tokenizer
    from core.skills.base import SkillError

    try:
        skill = _registry(realm, config, ledger).get(args.skill)
    except SkillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return NOT_FOUND
    current = ledger.skill_level(config.hero.name, skill.name)
    if args.level is None and current > skill.max_level:
        print(f"{skill.name}: mastered (level {current}, every level 0..{skill.max_level} passed); {mastered_hint}")
        return OK
    level = current if args.level is None else args.level
    if not 0 <= level <= skill.max_level:
        print(f"error: skill {skill.name} has levels 0..{skill.max_level}, not {level}", file=sys.stderr)
        return USAGE
    try:
        model_dir, step = _model_dir(realm, config, args.checkpoint)
        model, tokenizer = load_model(model_dir, config.hero), load_tokenizer(model_dir, config.hero)
    except (HeroError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return NOT_FOUND
    return skill, current, level, model_dir, step, model, tokenizer


def cmd_trial(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.skills.base import SkillError
    from core.skills.trials import run_trial, trial_seed

    realm.ensure_layout()
    hero, s = config.hero.name, config.skills
    samples = args.samples if args.samples is not None else s.trial_samples
    if samples < 30:
        print("error: --samples must be at least 30", file=sys.stderr)
        return USAGE
    ledger = Ledger(realm.ledger_path)
    try:
        target = _target(args, realm, config, ledger, mastered_hint="--level N re-tests a level")
        if isinstance(target, int):
            return target
        skill, current, level, model_dir, step, model, tokenizer = target
        seed = trial_seed(hero, skill.name, level, step, ledger.count_trials(hero, skill.name, level, step))
        try:
            result = run_trial(model, tokenizer, skill, level, n=samples, seed=seed,
                               max_new_tokens=s.max_new_tokens, batch_size=s.trial_batch_size)
        except SkillError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return NOT_FOUND
        record = result.record(hero=hero, current_level=current, threshold=s.promotion_threshold,
                               global_step=step, checkpoint=model_dir.name, sample_answers=s.sample_answers)
        trial_id = ledger.record_trial(record)
    finally:
        ledger.close()
    out = {**record.to_dict(), "id": trial_id}
    if args.json:
        print(json.dumps(out, indent=2))
        return OK
    verdict = (f"promoted to level {record.level_after}" if record.promoted else
               f"level stays {record.level_after}" + ("" if level == current else
                                                      f" (a trial at level {level} only measures)"))
    print(f"{skill.name} level {level} trial #{trial_id} on {model_dir.name}: {result.correct}/{result.n} right "
          f"({100 * result.accuracy:.1f}%), Wilson 95% lower bound {result.lower_bound:.3f} vs threshold "
          f"{s.promotion_threshold}: {verdict} ({result.duration_seconds:.1f} s)")
    for sample in record.samples:
        mark = "right" if sample["correct"] else "wrong"
        print(f"  {mark:5}  {sample['prompt'][:60]!r} -> {sample['answer'][:40]!r} (expected {sample['expected'][:40]!r})")
    return OK


def cmd_spar(args, realm: Realm, config: RealmConfig, environ) -> int:
    """A sparring round (:func:`core.skills.sparring.spar_round`) on a checkpoint."""
    from core.skills.base import SkillError
    from core.skills.sparring import spar_round

    realm.ensure_layout()
    hero = config.hero.name
    if args.count is not None and not 1 <= args.count <= 100_000:
        print("error: --count must be 1..100000", file=sys.stderr)
        return USAGE
    sparring = config.sparring if args.feedback_turn is None else \
        config.sparring.model_copy(update={"feedback_turn": args.feedback_turn})
    ledger = Ledger(realm.ledger_path)
    try:
        target = _target(args, realm, config, ledger, mastered_hint="--level N spars at a level")
        if isinstance(target, int):
            return target
        skill, current, level, model_dir, step, model, tokenizer = target
        try:
            record, _, path = spar_round(ledger, model, tokenizer, skill, hero=hero, level=level, global_step=step,
                                         checkpoint=model_dir.name, inbox=realm.inbox, sparring=sparring,
                                         skills=config.skills, samples=args.count)
        except SkillError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return NOT_FOUND
    finally:
        ledger.close()
    if args.json:
        print(json.dumps({**record.to_dict(), "path": str(path) if path else None}, indent=2))
        return OK
    where = (f"{record.examples} correction example(s) -> {path}" if path else
             "every answer right: no correction quest")
    print(f"{skill.name} level {level} sparring round #{record.round} on {model_dir.name}: {record.wrong}/{record.n} "
          f"wrong ({100 * record.accuracy:.1f}% right); {where} ({record.duration_seconds:.1f} s)")
    return OK


def cmd_skills(args, realm: Realm, config: RealmConfig, environ) -> int:
    return _skills_list(args, realm, config) if args.skills_command == "list" else _skills_quest(args, realm, config)


def _skills_list(args, realm: Realm, config: RealmConfig) -> int:
    realm.ensure_layout()
    ledger = Ledger(realm.ledger_path)
    try:
        registry = _registry(realm, config, ledger)
        summary = ledger.skill_summary(config.hero.name)
    finally:
        ledger.close()
    rows = []
    for name, skill in registry.skills.items():
        info = summary.get(name, {})
        last = info.get("last_trial")
        rows.append({**skill.describe(), "priority": registry.priorities.get(name, 0.0),
                     "level": info.get("level", 0), "trials": info.get("trials", 0),
                     "last_trial": None if last is None else {"level": last.level, "n": last.n,
                                                              "correct": last.correct, "accuracy": last.accuracy,
                                                              "lower_bound": last.lower_bound,
                                                              "step": last.global_step}})
    if args.json:
        print(json.dumps({"skills": rows, "errors": [e.to_dict() for e in registry.errors]}, indent=2))
        return OK
    for r in rows:
        last = r["last_trial"]
        tried = (f"last trial level {last['level']}: {last['correct']}/{last['n']} (bound {last['lower_bound']:.3f}) "
                 f"at step {last['step']}" if last else "no trial yet")
        print(f"{r['name']:10} level {r['level']:>2}/{r['max_level'] + 1}  priority {r['priority']:<4g} "
              f"{r['trials']} trial(s), {tried}\n           {r['description']}")
    for e in registry.errors:
        print(f"not loaded: {e.source}: {e.message.strip().splitlines()[-1]}")
    return OK


def _skills_quest(args, realm: Realm, config: RealmConfig) -> int:
    from core.skills.base import SkillError
    from core.skills.quests import mixed_items, quest_file_name, quest_record, write_quest

    realm.ensure_layout()
    ledger = Ledger(realm.ledger_path)
    try:
        registry = _registry(realm, config, ledger)
        try:
            skill = registry.get(args.skill)
        except SkillError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return NOT_FOUND
        levels = args.level or [min(ledger.skill_level(config.hero.name, skill.name), skill.max_level)]
    finally:
        ledger.close()
    if args.count < 1 or args.count > 10_000_000:
        print("error: --count must be 1..10000000", file=sys.stderr)
        return USAGE
    key = args.key or str(time.time_ns())
    try:
        items = mixed_items(skill, levels, args.count, key)
    except SkillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    name = quest_file_name(skill.name, "-".join(map(str, levels)), key)  # type: ignore[arg-type]
    path = Path(args.out) if args.out else realm.inbox / args.priority / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_quest(path, (quest_record(it) for it in items))
    print(f"{len(items)} {skill.name} item(s) of level(s) {', '.join(map(str, levels))} -> {path}")
    return OK

"""``python -m training vault list|prune|backup|promote|restore``: terminal output of
:mod:`management.vault_ops`. Exit codes: 0 done, 1 refused (the message says why), 10 a copy failed its
SHA-256 verification or the filesystem failed."""

from __future__ import annotations

import json
import sys
import time

from core.checkpoint_layout import checkpoint_name
from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm

OK, REFUSED, ERROR = 0, 1, 10


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def _metric(x: float | None) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def _print_prune(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    plan = result.plan
    verb = "would remove" if result.dry_run else "removed"
    for d in plan.keep:
        strip = " (optimizer state stripped)" if any(s.name == d.name for s in plan.strip_optimizer) else ""
        print(f"keep    {d.name}  {', '.join(d.reasons)}{strip}")
    for d in plan.remove:
        mark = " REFUSED: " + result.refused[d.name] if d.name in result.refused else ""
        print(f"remove  {d.name}  {_size(d.size_bytes)}: {d.reasons[0]}{mark}")
    if result.skipped:
        print(f"nothing done: {result.skipped}")
    elif result.dry_run:
        print(f"dry run: {verb} {len(plan.remove)} checkpoint(s), strip {len(plan.strip_optimizer)}; about "
              f"{_size(plan.bytes_freed)} would be freed")
    else:
        print(f"{verb} {len(result.removed)} checkpoint(s), stripped {len(result.stripped)}; "
              f"{_size(result.bytes_freed)} freed")


def _print_list(realm: Realm, config: RealmConfig, ledger: Ledger, as_json: bool) -> None:
    from core.vault import list_checkpoints_info
    from management.vault_ops import checkpoint_facts, list_backups
    from management.versions import list_versions

    infos = list_checkpoints_info(realm, config.hero.name, ledger)
    optimizer = {f.name: f.has_optimizer for f in checkpoint_facts(realm, config.hero.name, ledger)}
    for info in infos:
        info["optimizer_state"] = optimizer.get(info["name"], False)
    versions = list_versions(realm, config.hero.name)
    backups = list_backups(realm, config)
    if as_json:
        print(json.dumps({"checkpoints": infos, "versions": versions, "backups": backups}, indent=2))
        return
    print(f"checkpoints of {config.hero.name} ({realm.checkpoints_dir(config.hero.name)}):")
    for i in infos or []:
        opt = "" if i["optimizer_state"] else "  weights only"
        if i.get("adapter"):
            full = f", a full checkpoint would be about {_size(i['full_size_bytes'])}" if i.get("full_size_bytes") else ""
            opt += f"  ({i['adapter']} adapter only{full})"
        tags = f"  [{', '.join(i['tags'])}]" if i["tags"] else ""
        print(f"  {i['name']}  {_when(i['time'])}  loss {_metric(i['loss'])}  eval_loss {_metric(i['eval_loss'])}"
              f"  {_size(i['size_bytes'])}{tags}{opt}")
    if not infos:
        print("  none yet")
    print(f"named versions ({realm.hero_dir(config.hero.name) / 'versions'}):")
    for v in versions:
        print(f"  {v['name']}  global step {v.get('global_step')}  from {v.get('source_checkpoint')}  "
              f"{_when(v.get('created_at'))}  loss {_metric((v.get('metrics') or {}).get('loss'))}  "
              f"quests {len(v.get('quests_seen') or [])}")
    if not versions:
        print("  none")
    print("backups:")
    for b in backups:
        print(f"  {b['name']}  {_size(b['bytes'])}  {b['path']}")
    if not backups:
        print("  none")


def run_vault_command(args, realm: Realm, config: RealmConfig) -> int:
    """Dispatch ``args.vault_command``; returns the exit code."""
    from core.vault import VaultError
    from management import vault_ops, versions

    realm.ensure_layout()
    ledger = Ledger(realm.ledger_path)
    try:
        cmd = args.vault_command
        if cmd == "list":
            _print_list(realm, config, ledger, args.json)
        elif cmd == "prune":
            _print_prune(vault_ops.prune(realm, config, ledger, dry_run=args.dry_run), args.json)
        elif cmd == "backup":
            r = vault_ops.backup(realm, config, ledger, args.step, folder=args.to)
            state = "already backed up, verified" if r["already"] else "backed up, SHA-256 verified"
            print(f"{checkpoint_name(args.step)} {state}: {r['path']} ({r['files']} files, {_size(r['bytes'])})")
        elif cmd == "promote":
            meta = versions.promote(realm, config, ledger, args.step, args.name)
            print(f"version {args.name} created from {meta['source_checkpoint']} (global step "
                  f"{meta['global_step']}, {len(meta['quests_seen'])} quests seen, base model "
                  f"{meta['base_model'] or 'embedded default'})")
        elif cmd == "restore":
            r = versions.restore(realm, config, ledger, args.name)
            print(f"version {args.name} restored as {r['checkpoint']}: the next start trains on its weights, "
                  f"continuing at global step {r['global_step']}")
            if r["previous_saved_as"]:
                print(f"the previous latest checkpoint was kept as version {r['previous_saved_as']}")
        return OK
    except (vault_ops.VaultOpsError, VaultError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return REFUSED
    except (vault_ops.BackupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR
    finally:
        ledger.close()

"""The command line: ``python -m training <command>``. Exit codes are :class:`ExitCode`.

The environment is passed in (``main(argv, environ)``) so tests can replace it; the realm is
``--realm DIR``, else ``REALM_HOME``, else the repository root.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from enum import IntEnum
from pathlib import Path

from core.checkpoint_layout import EXAMPLE_NAME, parse_step_argument
from core.config import ConfigError, RealmConfig, config_json_schema
from core.realm import PRIORITIES, Realm, default_realm_root, init_realm
from training import skills_cli


class ExitCode(IntEnum):
    OK = 0
    REJECTED = 1          # validate: the file would go to queue/failed/; doctor: problems found;
    #                       vault: the operation was refused (the message says why)
    USAGE = 2             # bad command line (argparse)
    CONFIG = 3            # config.json invalid
    ALREADY_RUNNING = 4   # a daemon already runs on this realm
    NOT_FOUND = 5         # a file, model or process that was named does not exist
    ERROR = 10            # anything else (see the log)


CONTROL_COMMANDS = ("pause", "resume", "skip")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Realm of Training: continuous "
                                "fine-tuning of a small language model (the hero).")
    p.add_argument("--realm", help="realm folder (default: $REALM_HOME or the repository root)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    s = sub.add_parser("start-all", help="start the supervisor, detached, which runs the daemon and the "
                       "Tavern under a watchdog")
    s.add_argument("--no-tavern", action="store_true", help="start the daemon only")
    s = sub.add_parser("stop-all", help="stop everything warmly (checkpoint first), SIGKILL after a timeout")
    s.add_argument("--timeout", type=float, default=None, help="seconds each process gets to stop warmly "
                   "before SIGKILL (default: supervisor.stop_timeout_seconds)")
    s = sub.add_parser("supervise", help="run the daemon and the Tavern under a watchdog in the foreground "
                       "(restart on crash or hang, with backoff; start-all runs this detached)")
    s.add_argument("--no-tavern", action="store_true", help="supervise the daemon only")
    s = sub.add_parser("vault", help="checkpoints: list, prune, backup, promote to a named version, restore")
    vault = s.add_subparsers(dest="vault_command", required=True, metavar="vault-command")
    v = vault.add_parser("list", help="checkpoints (tags, size, optimizer state), named versions, backups")
    v.add_argument("--json", action="store_true")
    v = vault.add_parser("prune", help="apply the retention policy (config `retention`)")
    v.add_argument("--dry-run", action="store_true", help="only show what would be removed and why")
    v.add_argument("--json", action="store_true")
    v = vault.add_parser("backup", help="copy a checkpoint to backup.folder and verify its SHA-256")
    v.add_argument("step", type=_global_step, help=f"global step (1234) or checkpoint name ({EXAMPLE_NAME})")
    v.add_argument("--to", help="backup folder (default: config backup.folder)")
    v = vault.add_parser("promote", help="make a checkpoint a named version (models/<hero>/versions/NAME)")
    v.add_argument("step", type=_global_step, help=f"global step (1234) or checkpoint name ({EXAMPLE_NAME})")
    v.add_argument("--name", required=True, help="version name: letters, digits, '_', '.', '-'")
    v = vault.add_parser("restore", help="make a named version the hero's starting point again (the daemon "
                         "must be stopped; the global step goes on)")
    v.add_argument("name")
    s = sub.add_parser("status", help="hero, global step, current quest, queue, last checkpoint")
    s.add_argument("--json", action="store_true")
    sub.add_parser("doctor", help="check python, torch, GPU, disk, config, model, tokenizer, folders")
    s = sub.add_parser("daemon", help="run the daemon in the foreground")
    s.add_argument("--until-idle", action="store_true",
                   help="exit 0 once the inbox and queue hold nothing trainable (batch mode)")
    s = sub.add_parser("tavern", help="run the Tavern web app in the foreground")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s = sub.add_parser("validate", help="validate a file and print its report (exit 0 accepted, 1 rejected)")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print the JSON report")
    s = sub.add_parser("eval", help="held-out loss of a checkpoint (or the base model) on a quest file")
    s.add_argument("file")
    s.add_argument("--checkpoint", default="latest", help=f"checkpoint name ({EXAMPLE_NAME}), 'latest' or 'base'")
    s.add_argument("--max-examples", type=int, default=256)
    s.add_argument("--every", type=int, default=1, help="use records N-1, 2N-1, ... (N = training.eval_holdout_every: the ones training held out)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("enqueue", help="copy a file into the inbox (the daemon validates and queues it)")
    s.add_argument("file")
    s.add_argument("--priority", choices=PRIORITIES, default="normal")
    s = sub.add_parser("init", help="create a realm folder")
    s.add_argument("dir")
    s.add_argument("--base-model", help="local Hugging Face model folder or cached hub id")
    s = sub.add_parser("new-hero", help="create the embedded default hero (random-init Qwen3)")
    s.add_argument("--size", choices=["nano", "micro", "tiny", "small"], default="micro")
    s.add_argument("--force", action="store_true", help="replace an existing default hero")
    s = sub.add_parser("config", help="show the config or its JSON Schema")
    s.add_argument("--schema", action="store_true", help="print the JSON Schema of config.json")
    for name in CONTROL_COMMANDS:
        sub.add_parser(name, help=f"{name} training (sent to the daemon through the control channel)")
    skills_cli.add_parsers(sub)
    return p


def _global_step(text: str) -> int:
    """``1234`` or ``step-00001234`` -> 1234 (:func:`core.checkpoint_layout.parse_step_argument`)."""
    try:
        return parse_step_argument(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0) and ExitCode.USAGE
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "init":
        realm = init_realm(args.dir, base_model=args.base_model)
        print(f"realm created at {realm.root}")
        return ExitCode.OK
    realm = Realm.at(args.realm) if args.realm else Realm.at(default_realm_root(environ))
    if args.command == "config" and args.schema:
        print(json.dumps(config_json_schema(), indent=2))
        return ExitCode.OK
    try:
        config = realm.load_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    handler = COMMANDS[args.command]
    try:
        return handler(args, realm, config, environ)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.NOT_FOUND


# commands --------------------------------------------------------------------------------
def cmd_config(args, realm: Realm, config: RealmConfig, environ) -> int:
    print(json.dumps(config.model_dump(), indent=2))
    return ExitCode.OK


def cmd_daemon(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.daemon import AlreadyRunning, Daemon
    from management.hooks import CheckpointHooks

    realm.ensure_layout()
    hooks = CheckpointHooks(realm, config)  # disk guard before each save, retention after it
    try:
        return Daemon(realm, config, until_idle=args.until_idle, checkpoint_hooks=hooks).run()
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ALREADY_RUNNING


def cmd_tavern(args, realm: Realm, config: RealmConfig, environ) -> int:
    from tavern.server import run

    try:
        run(realm, config, host=args.host, port=args.port)
    except ValueError as exc:  # e.g. a non-loopback bind without an access token
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.OK


def cmd_start_all(args, realm: Realm, config: RealmConfig, environ) -> int:
    from training.processes import SUPERVISOR, ProcessState, process_info, start_detached

    for role in (SUPERVISOR, "daemon"):
        info = process_info(realm, role)
        if info.state == ProcessState.RUNNING:
            print(f"error: a {role} already runs on {realm.root} (pid {info.pid}); "
                  "`python -m training stop-all` stops it", file=sys.stderr)
            return ExitCode.ALREADY_RUNNING
    realm.ensure_layout()
    tavern = not args.no_tavern and _tavern_available()
    pid = start_detached(realm, SUPERVISOR, [] if tavern else ["--no-tavern"], environ=environ)
    children = _wait_for_children(realm, pid, ("daemon", "tavern") if tavern else ("daemon",))
    if children is None:
        print(f"error: the supervisor (pid {pid}) ended at once; see {realm.logs / 'supervisor.log'}",
              file=sys.stderr)
        return ExitCode.ERROR
    print(f"supervisor started (pid {pid}); log: {realm.logs / 'supervisor.log'}")
    for role, child in children.items():
        where = f" on http://{config.tavern.host}:{config.tavern.port}/" if role == "tavern" else ""
        print(f"{role} {child.get('state')} (pid {child.get('pid')}){where}; log: {realm.logs / (role + '.log')}")
    print(f"drop .jsonl files into {realm.inbox}/ ; `python -m training status` shows progress; "
          "`python -m training stop-all` stops everything")
    return ExitCode.OK


def _wait_for_children(realm: Realm, pid: int, roles: tuple[str, ...], timeout_seconds: float = 20.0):
    """The supervisor's published children once it has started them all (None if it died first)."""
    from core.ledger import Ledger
    from safety.processes import alive
    from safety.supervisor import SUPERVISOR_KEY

    deadline = time.monotonic() + timeout_seconds
    children: dict = {}
    while time.monotonic() < deadline:
        if realm.ledger_path.exists():
            ledger = Ledger(realm.ledger_path)
            try:
                value = ledger.get_value(SUPERVISOR_KEY) or {}
            finally:
                ledger.close()
            if value.get("pid") == pid:
                children = value.get("children") or {}
                if all((children.get(r) or {}).get("pid") for r in roles):
                    return children
        if not alive(pid):
            return None
        time.sleep(0.2)
    return children


def _tavern_available() -> bool:
    try:
        import tavern.server  # noqa: F401
    except ImportError:
        return False
    return True


def cmd_stop_all(args, realm: Realm, config: RealmConfig, environ) -> int:
    from safety.supervisor import request_stop_timeout
    from training.processes import ROLES, SUPERVISOR, ProcessState, process_info, stop

    timeout = args.timeout if args.timeout is not None else config.supervisor.stop_timeout_seconds
    before = {role: process_info(realm, role) for role in ROLES}
    supervisor = process_info(realm, SUPERVISOR).state
    if supervisor == ProcessState.RUNNING:
        request_stop_timeout(realm, timeout)  # the supervisor gives its children this long, then SIGKILL
    if supervisor != ProcessState.STOPPED:
        print(stop(realm, SUPERVISOR, timeout_seconds=timeout + 30))
    for role in reversed(ROLES):  # the Tavern first, then the daemon (which checkpoints)
        now = process_info(realm, role)
        if now.state != ProcessState.STOPPED or before[role].state != ProcessState.RUNNING:
            print(stop(realm, role, timeout_seconds=timeout))  # not supervised, or left behind
        else:
            print(f"{role}: stopped (pid {before[role].pid})")
    return ExitCode.OK


def cmd_status(args, realm: Realm, config: RealmConfig, environ) -> int:
    from training.status import collect_status, format_status

    status = collect_status(realm, config)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return ExitCode.OK


def cmd_validate(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.chat import count_tokens
    from core.validation import format_report_text, validate_file
    from training.hero_tokenizer import hero_tokenizer

    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    tokenizer = hero_tokenizer(realm, config)
    report = validate_file(path, display_name=path.name, config=config,
                           count_tokens=lambda ex: count_tokens(ex, tokenizer))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report_text(report))
    return ExitCode.OK if report.accepted else ExitCode.REJECTED


def cmd_eval(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.checkpoint_layout import latest_checkpoint, list_checkpoints
    from core.evaluation import evaluate_file
    from core.hero import resolve_model_source

    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if args.checkpoint == "base":
        model_dir = Path(resolve_model_source(realm, config.hero, create=False)[0])
    elif args.checkpoint == "latest":
        model_dir = latest_checkpoint(realm.checkpoints_dir(config.hero.name))
        if model_dir is None:
            raise FileNotFoundError("no checkpoint yet (use --checkpoint base)")
    else:
        matches = [p for p in list_checkpoints(realm.checkpoints_dir(config.hero.name)) if p.name == args.checkpoint]
        if not matches:
            raise FileNotFoundError(f"no checkpoint named {args.checkpoint!r}")
        model_dir = matches[0]
    loss, n = evaluate_file(model_dir, path, config, max_examples=args.max_examples, every=args.every)
    result = {"checkpoint": model_dir.name, "file": str(path), "examples": n, "loss": loss}
    print(json.dumps(result) if args.json else f"{model_dir.name}: loss {loss:.4f} nats/token on {n} examples")
    return ExitCode.OK


def cmd_enqueue(args, realm: Realm, config: RealmConfig, environ) -> int:
    src = Path(args.file)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    realm.ensure_layout()
    folder = realm.inbox / args.priority
    dest = folder / src.name
    n = 1
    while dest.exists():
        stem, dot, ext = src.name.partition(".")
        dest = folder / f"{stem}-{n}{dot}{ext}"
        n += 1
    tmp = folder / f".enqueue-{os.getpid()}-{time.time_ns()}.part"
    shutil.copyfile(src, tmp)
    os.rename(tmp, dest)  # appears complete, under a name nobody else uses
    print(f"{src} -> {dest} ({args.priority}); the daemon validates and queues it")
    return ExitCode.OK


def cmd_new_hero(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.hero import create_default_hero

    dest = realm.hero_dir(config.hero.name) / "base"
    if dest.exists() and not args.force:
        print(f"error: {dest} exists (use --force to replace it)", file=sys.stderr)
        return ExitCode.ERROR
    if dest.exists():
        shutil.rmtree(dest)
    path = create_default_hero(dest, args.size, config.training.seed)
    print(f"newborn hero ({args.size}) created at {path}")
    if config.hero.base_model:
        print(f"note: config.json sets hero.base_model={config.hero.base_model!r}, which takes precedence")
    return ExitCode.OK


def cmd_control(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.ledger import Ledger

    realm.ensure_layout()
    ledger = Ledger(realm.ledger_path)
    try:
        command_id = ledger.send_command(args.command)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = ledger.query("SELECT * FROM commands WHERE id=?", (command_id,))[0]
            if row["state"] != "pending":
                print(f"{args.command}: {row['result']}")
                return ExitCode.OK
            time.sleep(0.1)
        print(f"{args.command}: sent; the daemon has not answered yet (is it running?)")
        return ExitCode.OK
    finally:
        ledger.close()


def cmd_doctor(args, realm: Realm, config: RealmConfig, environ) -> int:
    from training.doctor import run_checks

    problems = 0
    for check in run_checks(realm, config):
        mark = "ok " if check.ok else "!! "
        print(f"{mark}{check.name}: {check.detail}")
        if not check.ok:
            problems += 1
            print(f"    fix: {check.fix}")
    return ExitCode.OK if problems == 0 else ExitCode.REJECTED


def cmd_supervise(args, realm: Realm, config: RealmConfig, environ) -> int:
    from management.scheduler import start_prune_scheduler
    from safety.processes import remove_pid
    from safety.supervisor import AlreadySupervised, Supervisor
    from training.processes import SUPERVISOR

    scheduler = start_prune_scheduler(realm, config) if config.retention.enabled else None
    try:
        roles = ("daemon",) if args.no_tavern else ("daemon", "tavern")
        return Supervisor(realm, config, roles=roles, environ=environ).run()
    except AlreadySupervised as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ALREADY_RUNNING
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        remove_pid(realm, SUPERVISOR, os.getpid())  # start-all wrote it; nothing if run in the foreground


def cmd_vault(args, realm: Realm, config: RealmConfig, environ) -> int:
    from training.vault_cli import run_vault_command

    return run_vault_command(args, realm, config)


COMMANDS = {
    "config": cmd_config, "daemon": cmd_daemon, "tavern": cmd_tavern, "start-all": cmd_start_all,
    "stop-all": cmd_stop_all, "status": cmd_status, "validate": cmd_validate, "eval": cmd_eval, "enqueue": cmd_enqueue,
    "new-hero": cmd_new_hero, "doctor": cmd_doctor, "supervise": cmd_supervise, "vault": cmd_vault, **{c: cmd_control for c in CONTROL_COMMANDS},
    "trial": skills_cli.cmd_trial, "skills": skills_cli.cmd_skills,
}

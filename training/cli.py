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
from core.realm import PRIORITIES, REALM_ENV, Realm, default_realm_root, init_realm
from training import export_cli, skills_cli


class ExitCode(IntEnum):
    OK = 0
    REJECTED = 1          # validate: the file would go to queue/failed/; doctor: problems found;
    #                       vault: the operation was refused (the message says why)
    USAGE = 2             # bad command line (argparse)
    CONFIG = 3            # config.json invalid
    ALREADY_RUNNING = 4   # a daemon already runs on this realm
    NOT_FOUND = 5         # a file, model or process that was named does not exist
    ERROR = 10            # anything else: an unexpected error (one line on stderr, the traceback in the log)
    INTERRUPTED = 130     # Ctrl-C (128 + SIGINT, as shells report it)
    BROKEN_PIPE = 141     # the reader of stdout went away (`status | head -3`): 128 + SIGPIPE, silently


CONTROL_COMMANDS = {
    "pause": "pause training after the current optimizer step (the quest stays where it is)",
    "resume": "resume paused training",
    "skip": "put the current quest back in the queue (nothing lost) and train the next one",
    "stop": "stop the daemon warmly: checkpoint, then exit (a supervisor does not restart it)",
}
LOGGING_COMMANDS = ("daemon", "tavern", "supervise")
"""Long-running commands: their stderr is their log (``logs/<role>.log`` under ``start-all``), where the
supervisor's crash classifier (:mod:`safety.crash`) reads the traceback of an unexpected error."""
CLI_LOG = "cli.log"
"""``logs/cli.log``: tracebacks of unexpected errors in the other commands (stderr shows one line)."""

log = logging.getLogger("training.cli")
REALM_READERS = ("status", "stop-all", "vault", *CONTROL_COMMANDS)
"""Commands that only read or act on an existing realm: a realm folder that does not exist is NOT_FOUND."""
PRESET_NAMES = ("cpu", "8gb", "16gb", "24gb", "80gb")  # core.presets.PRESETS (a test keeps them equal)
# commands that train or print the training setup: a config this machine cannot train (e.g. QLoRA without
# CUDA) is refused there with exit 3 (core.adapters.check_environment)
TRAINING_COMMANDS = ("config", "daemon", "start-all", "supervise", "eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Realm of Training: continuous "
                                "fine-tuning of a small language model (the hero).")
    p.add_argument("--realm", help="realm folder (default: $REALM_HOME or the repository root)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    s = sub.add_parser("start-all", help="start the supervisor, detached, which runs the daemon and the "
                       "Tavern under a watchdog")
    s.add_argument("--no-tavern", action="store_true", help="start the daemon only")
    _add_process_arguments(s)
    s = sub.add_parser("stop-all", help="stop everything warmly (checkpoint first), SIGKILL after a timeout")
    s.add_argument("--timeout", type=float, default=None, help="seconds each process gets to stop warmly "
                   "before SIGKILL (default: supervisor.stop_timeout_seconds)")
    s = sub.add_parser("supervise", help="run the daemon and the Tavern under a watchdog in the foreground "
                       "(restart on crash or hang, with backoff; start-all runs this detached)")
    s.add_argument("--no-tavern", action="store_true", help="supervise the daemon only")
    _add_process_arguments(s)
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
    s = sub.add_parser("eval", help="held-out loss (SFT file), preference accuracy and mean margin (preference file) or "
                       "mean reward of greedy completions (prompt file) of a checkpoint or the base model")
    s.add_argument("file")
    s.add_argument("--checkpoint", default="latest",
                   help=f"checkpoint name ({EXAMPLE_NAME}), its global step (1234), 'latest' or 'base'")
    s.add_argument("--compare-base", action="store_true",
                   help="also evaluate the base model and print both and the delta (checkpoint - base)")
    s.add_argument("--max-examples", type=int, default=256)
    s.add_argument("--every", type=int, default=1, help="use records N-1, 2N-1, ... (N = training.eval_holdout_every: the ones training held out)")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("enqueue", help="copy a file, or download a URL (https, hf://datasets/..., s3://, gs://), "
                       "into the inbox (the daemon validates and queues it)")
    s.add_argument("file", metavar="FILE|URL")
    s.add_argument("--priority", choices=PRIORITIES, default="normal")
    s = sub.add_parser("init", help="create a realm folder")
    s.add_argument("dir")
    s.add_argument("--base-model", help="local Hugging Face model folder or cached hub id")
    s.add_argument("--preset", choices=PRESET_NAMES, help="training settings for the machine's memory: adapter, "
                   "micro-batch, accumulation, gradient checkpointing, precision (README: Presets)")
    s = sub.add_parser("new-hero", help="create the embedded default hero (random-init Qwen3)")
    s.add_argument("--size", choices=["nano", "micro", "tiny", "small"], default="micro")
    s.add_argument("--force", action="store_true", help="replace an existing default hero")
    s = sub.add_parser("config", help="show the config or its JSON Schema")
    s.add_argument("--schema", action="store_true", help="print the JSON Schema of config.json")
    for name, what in CONTROL_COMMANDS.items():
        sub.add_parser(name, help=f"{what} (sent to the daemon through the control channel)")
    export_cli.add_parsers(sub)  # export, chat
    skills_cli.add_parsers(sub)  # trial, spar, skills
    return p


def _add_process_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--processes", type=_processes, default=None, metavar="N",
                   help="train with N data parallel processes (accelerate launch: DDP, one per GPU; gloo on "
                   "the CPU); default 1, or the accelerate config's num_processes")
    s.add_argument("--accelerate-config", metavar="FILE", help="an `accelerate config` file for the daemon's "
                   "launch: GPU ids, ports, machines (DDP; FSDP and DeepSpeed are refused: README, Multi-GPU and multi-node)")


def _processes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of processes: {text!r}") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"--processes must be 1 to 1024, not {value}")
    return value


def _launcher(args) -> list[str] | None:
    """``accelerate launch`` arguments for the daemon (:func:`core.distributed.launch_command`), None for
    one plain process (the default: exactly as without the option). Raises ValueError for a missing file."""
    from core.distributed import config_file_problem, launch_command

    config = getattr(args, "accelerate_config", None)
    processes = getattr(args, "processes", None)
    if config:
        path = Path(config).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"--accelerate-config {config}: no such file")
        if problem := config_file_problem(str(path)):
            raise ValueError(problem)
        return launch_command(processes, str(path))
    return launch_command(processes, None) if processes and processes > 1 else None


def _process_arguments(args) -> list[str]:
    """``--processes``/``--accelerate-config`` again, for the supervisor that start-all starts."""
    out = []
    if getattr(args, "processes", None):
        out += ["--processes", str(args.processes)]
    if getattr(args, "accelerate_config", None):
        out += ["--accelerate-config", str(Path(args.accelerate_config).expanduser().resolve())]
    return out


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
    try:
        return _run(args, environ)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # as the Python docs advise: point stdout at /dev/null so the interpreter's final flush stays quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, the traceback in the log
        _report_unexpected(exc, args, environ)
        return ExitCode.ERROR


def _report_unexpected(exc: Exception, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """An error no command expected: the long-running commands log it with its traceback (their stderr is
    their log); the others print one line and append the traceback to ``logs/cli.log`` of the realm (with
    ``--log-level DEBUG`` they log it on stderr instead)."""
    summary = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0][:500]
    if args.command in LOGGING_COMMANDS or args.log_level == "DEBUG":
        log.error("unexpected error in `%s`: %s", args.command, summary, exc_info=exc)
        return
    where = _append_traceback(exc, args, environ)
    print(f"error: unexpected {summary} (the traceback is in {where or 'no log: the realm has no logs/ folder'}; "
          "--log-level DEBUG prints it here)", file=sys.stderr)


def _append_traceback(exc: Exception, args: argparse.Namespace, environ: Mapping[str, str]) -> Path | None:
    """Append ``exc``'s traceback to the realm's ``logs/cli.log``; its path, or None when there is no such
    folder (no realm there) or it cannot be written."""
    import traceback

    try:
        realm = Realm.at(args.realm) if args.realm else Realm.at(default_realm_root(environ))
        path = realm.logs / CLI_LOG
        if not realm.logs.is_dir():
            return None
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} `python -m training {args.command}` (pid "
                    f"{os.getpid()}) failed:\n{''.join(traceback.format_exception(exc))}\n")
        return path
    except Exception:  # noqa: BLE001 - never hide the original error behind this one
        return None


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.command == "init":
        return cmd_init(args)
    realm = Realm.at(args.realm) if args.realm else Realm.at(default_realm_root(environ))
    if args.command == "config" and args.schema:
        print(json.dumps(config_json_schema(), indent=2))
        return ExitCode.OK
    if not realm.root.is_dir():
        missing = f"no realm at {realm.root} (from {'--realm' if args.realm else '$' + REALM_ENV}); " \
                  f"`python -m training init {realm.root}` creates one"
        if args.command in REALM_READERS:
            print(f"error: {missing}", file=sys.stderr)
            return ExitCode.NOT_FOUND
        print(f"warning: {missing}; going on with the default config", file=sys.stderr)
    try:
        config = realm.load_config()
        if args.command in TRAINING_COMMANDS:
            from core.adapters import check_environment

            check_environment(config, str(realm.config_path))
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
    for line in _memory_lines(realm, config):  # stderr: stdout stays the config's JSON
        print(line, file=sys.stderr)
    return ExitCode.OK


def _memory_lines(realm: Realm, config: RealmConfig, device: str | None = None) -> list[str]:
    """The training memory estimate (core.memory) for this machine's device, as text lines."""
    from core.hero import HeroError
    from core.memory import MemoryEstimateError, estimate_for_realm

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return estimate_for_realm(realm, config, device=device).lines()
    except (MemoryEstimateError, HeroError, OSError, ValueError) as exc:
        return [f"training memory estimate: not available ({exc})"]


def cmd_init(args) -> int:
    from core.hero import HeroError
    from core.memory import GIB, MemoryEstimateError, estimate_for_realm
    from core.presets import PRESETS, preset_overrides

    overrides = preset_overrides(args.preset) if args.preset else None
    try:
        realm = init_realm(args.dir, base_model=args.base_model, overrides=overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    print(f"realm created at {realm.root}")
    if not args.preset:
        return ExitCode.OK
    preset = PRESETS[args.preset]
    print(f"preset {preset.name}: {preset.description}; training: " +
          ", ".join(f"{k}={json.dumps(v)}" for k, v in preset.training.items()))
    config = realm.load_config()
    device = "cpu" if preset.memory_gib is None else "cuda"
    try:
        est = estimate_for_realm(realm, config, device=device)
    except (MemoryEstimateError, HeroError, OSError, ValueError) as exc:
        print(f"training memory estimate: not available ({exc})")
        return ExitCode.OK
    print("\n".join(est.lines()))
    if preset.memory_gib is not None and est.total_bytes > preset.memory_gib * GIB:
        print(f"warning: the estimate exceeds the preset's {preset.memory_gib:g} GiB: lower training.max_length "
              "or micro_batch_size, or choose a smaller base model")
    from core.adapters import environment_problems

    for problem in environment_problems(config.training):
        print(f"note: this machine cannot train this config ({problem}); the daemon refuses it here")
    return ExitCode.OK


def cmd_daemon(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.daemon import AlreadyRunning, Daemon
    from core.distributed import Ranks
    from management.hooks import CheckpointHooks
    from training.webhooks import start_webhooks

    ranks = Ranks.from_env()  # set by accelerate launch / torchrun (core.distributed)
    if not ranks.is_main:  # a follower rank: no inbox, ledger, checkpoints or webhooks of its own
        from core.follower import Follower

        try:
            return Follower(realm, config, ranks).run()
        except ConfigError as exc:  # e.g. launched with FSDP
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.CONFIG
    realm.ensure_layout()
    hooks = CheckpointHooks(realm, config)  # disk guard before each save, retention after it
    webhooks = start_webhooks(realm, config)  # delivers unless the supervisor does
    try:
        return Daemon(realm, config, until_idle=args.until_idle, checkpoint_hooks=hooks).run()
    except ConfigError as exc:  # e.g. launched with FSDP (core.distributed.sharded_backend_problem)
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ALREADY_RUNNING
    finally:
        if webhooks is not None:
            webhooks.stop()


def cmd_tavern(args, realm: Realm, config: RealmConfig, environ) -> int:
    from tavern.server import run

    try:
        run(realm, config, host=args.host, port=args.port)
    except ValueError as exc:  # e.g. a non-loopback bind without an access token
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.OK


def cmd_start_all(args, realm: Realm, config: RealmConfig, environ) -> int:
    """One start-all at a time per realm (``run/start-all.lock``): a second one started meanwhile waits,
    then finds the first one's supervisor and exits ALREADY_RUNNING."""
    from core.fsutil import ExclusiveLock
    from core.realm import START_ALL_LOCK

    realm.ensure_layout()
    lock = ExclusiveLock(realm.lock_file(START_ALL_LOCK))
    deadline = time.monotonic() + START_LOCK_WAIT_SECONDS
    while not lock.acquire():
        if time.monotonic() >= deadline:
            print(f"error: another start-all is still starting on {realm.root}", file=sys.stderr)
            return ExitCode.ALREADY_RUNNING
        time.sleep(0.1)
    try:
        return _start_all(args, realm, config, environ)
    finally:
        lock.release()


START_LOCK_WAIT_SECONDS = 60.0


def _start_all(args, realm: Realm, config: RealmConfig, environ) -> int:
    from training.processes import (
        SUPERVISOR,
        ProcessState,
        daemon_finished_under,
        process_info,
        start_detached,
        stop,
    )

    for role in (SUPERVISOR, "daemon"):
        info = process_info(realm, role)
        if info.state == ProcessState.RUNNING and role == SUPERVISOR and daemon_finished_under(realm, info.pid):
            print(f"the supervisor (pid {info.pid}) runs without a daemon (stopped from the Tavern or given "
                  "up): restarting it")
            print(stop(realm, SUPERVISOR, timeout_seconds=config.supervisor.stop_timeout_seconds + 30))
        elif info.state == ProcessState.RUNNING:
            print(f"error: a {role} already runs on {realm.root} (pid {info.pid}); "
                  "`python -m training stop-all` stops it", file=sys.stderr)
            return ExitCode.ALREADY_RUNNING
    tavern = not args.no_tavern and _tavern_available()
    try:
        _launcher(args)  # a missing --accelerate-config file: an error now, not in the supervisor's log
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        pid = start_detached(realm, SUPERVISOR, ([] if tavern else ["--no-tavern"]) + _process_arguments(args),
                             environ=environ)
    except RuntimeError as exc:  # a supervisor appeared meanwhile (one run by hand)
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ALREADY_RUNNING
    children = _wait_for_children(realm, pid, ("daemon", "tavern") if tavern else ("daemon",))
    if children is None:
        print(f"error: the supervisor (pid {pid}) ended at once; see {realm.logs / 'supervisor.log'}",
              file=sys.stderr)
        return ExitCode.ERROR
    print(f"supervisor started (pid {pid}); log: {realm.logs / 'supervisor.log'}")
    for role, child in children.items():
        where = f" on http://{config.tavern.host}:{config.tavern.port}/" if role == "tavern" else ""
        if role == "daemon" and (args.processes or 1) > 1:
            where = f" as {args.processes} data parallel processes (accelerate launch)"
        print(f"{role} {child.get('state')} (pid {child.get('pid')}){where}; log: {realm.logs / (role + '.log')}")
    print(f"drop dataset files (.jsonl, .json, .csv, .tsv, .parquet, .txt) into {realm.inbox}/ ; `python -m training status` shows progress; "
          "`python -m training stop-all` stops everything")
    return ExitCode.OK


def _wait_for_children(realm: Realm, pid: int, roles: tuple[str, ...], timeout_seconds: float = 20.0):
    """The supervisor's published children once it has started them all (None if it died first)."""
    from core.ledger import Ledger
    from safety.processes import alive

    deadline = time.monotonic() + timeout_seconds
    children: dict = {}
    while time.monotonic() < deadline:
        if realm.ledger_path.exists():
            ledger = Ledger(realm.ledger_path)
            try:
                value = ledger.supervisor_status() or {}
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
    from core.chat import measure_batch
    from core.schools.teacher import school_check
    from core.validation import format_report_text, validate_file
    from training.hero_tokenizer import hero_tokenizer

    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    tokenizer = hero_tokenizer(realm, config)
    report = validate_file(path, display_name=path.name, config=config,
                           count_tokens_batch=lambda exs: measure_batch(exs, tokenizer, config.training.max_length),
                           school_check=school_check(realm, config, tokenizer))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report_text(report))
    return ExitCode.OK if report.accepted else ExitCode.REJECTED


def _eval_model_dir(name: str, realm: Realm, config: RealmConfig) -> Path:
    """The model folder ``eval --checkpoint`` names: base, latest, a checkpoint name or its global step
    (:func:`core.checkpoint_layout.parse_step_argument`)."""
    from core.checkpoint_layout import (
        checkpoint_name,
        latest_checkpoint,
        list_checkpoints,
        parse_step_argument,
    )
    from core.hero import resolve_model_source

    if name == "base":
        return Path(resolve_model_source(realm, config.hero, create=False)[0])
    if name == "latest":
        model_dir = latest_checkpoint(realm.checkpoints_dir(config.hero.name))
        if model_dir is None:
            raise FileNotFoundError("no checkpoint yet (use --checkpoint base)")
        return model_dir
    try:
        wanted = checkpoint_name(parse_step_argument(name))
    except ValueError:
        wanted = name
    matches = [p for p in list_checkpoints(realm.checkpoints_dir(config.hero.name)) if p.name == wanted]
    if not matches:
        raise FileNotFoundError(f"no checkpoint named {name!r}")
    return matches[0]


def cmd_eval(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.evaluation import (
        EvaluationError,
        evaluate_file,
        evaluate_preferences,
        evaluate_prompts,
        file_kind,
    )

    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    model_dir = _eval_model_dir(args.checkpoint, realm, config)
    try:
        kind = file_kind(path, config, model_dir, realm)
    except EvaluationError as exc:  # validation rejects the file
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.REJECTED
    if kind == "unpaired":
        print(f"error: {path.name} holds unpaired ratings (prompt/completion/label): eval compares pairs "
              "(prompt/chosen/rejected) or measures the loss of SFT records", file=sys.stderr)
        return ExitCode.REJECTED

    def measure(folder: Path) -> dict:
        if kind == "preference":
            return evaluate_preferences(folder, path, config, max_examples=args.max_examples, every=args.every,
                                        realm=realm)
        if kind == "prompts":
            return evaluate_prompts(folder, path, config, realm, max_examples=args.max_examples, every=args.every)
        loss, n = evaluate_file(folder, path, config, max_examples=args.max_examples, every=args.every,
                                realm=realm)
        return {"loss": loss, "examples": n}

    def line(name: str, r: dict) -> str:
        if kind == "preference":
            return (f"{name}: preference accuracy {r['preference_accuracy']:.2%}, mean margin "
                    f"{r['mean_margin']:+.4f} nats on {r['pairs']} pairs")
        if kind == "prompts":
            return f"{name}: mean reward {r['mean_reward']:.4f} of greedy completions on {r['prompts']} prompts"
        return f"{name}: loss {r['loss']:.4f} nats/token on {r['examples']} examples"

    try:
        result = {"checkpoint": model_dir.name, "file": str(path), **measure(model_dir)}
        if args.compare_base:
            base_dir = _eval_model_dir("base", realm, config)
            base = measure(base_dir)
            keys = {"preference": ("preference_accuracy", "mean_margin"), "prompts": ("mean_reward",)}.get(
                kind, ("loss",))
            result["base"] = base
            result["delta"] = {k: result[k] - base[k] for k in keys}
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.REJECTED
    if args.json:
        print(json.dumps(result))
    else:
        print(line(model_dir.name, result))
        if args.compare_base:
            print(line("base", result["base"]))
            print("delta: " + ", ".join(f"{k} {v:+.4f}" for k, v in result["delta"].items()))
    return ExitCode.OK


def cmd_enqueue(args, realm: Realm, config: RealmConfig, environ) -> int:
    from core.sources import is_url

    if is_url(args.file):
        from training.fetch import enqueue_url

        return enqueue_url(args.file, args.priority, realm, config)
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
    from core.ledger import CommandState, Ledger

    realm.ensure_layout()
    ledger = Ledger(realm.ledger_path)
    try:
        if (down := _daemon_down(ledger)) is not None:  # a command left pending would fire at the next start
            print(f"error: the training daemon is {down}: nothing to {args.command}; "
                  "`python -m training start-all` starts it", file=sys.stderr)
            return ExitCode.NOT_FOUND
        command_id = ledger.send_command(args.command)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = ledger.command(command_id)
            if row["state"] != CommandState.PENDING.value:
                print(f"{args.command}: {row['result']}")
                if args.command == "stop":
                    return _wait_for_daemon_stop(ledger, config.supervisor.stop_timeout_seconds)
                return ExitCode.OK
            time.sleep(0.1)
        print(f"{args.command}: sent; the daemon has not answered yet (is it running?)")
        return ExitCode.OK
    finally:
        ledger.close()


def _daemon_down(ledger) -> str | None:
    """How the daemon is down ("not running", "stopped"), None when it runs (the Tavern's rule)."""
    from tavern.status import daemon_view

    display = daemon_view(ledger, time.time())["display_state"]
    return display if display in ("not running", "stopped") else None


def _wait_for_daemon_stop(ledger, timeout_seconds: float) -> int:
    """After ``stop`` was accepted: wait until the daemon has saved its checkpoint and exited."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if _daemon_down(ledger) is not None:
            step = ledger.daemon_status().get("global_step")
            print(f"daemon stopped at global step {step}")
            return ExitCode.OK
        time.sleep(0.2)
    print(f"the daemon is still stopping after {timeout_seconds:.0f} s (saving a checkpoint?); "
          "`python -m training status` shows when it has stopped")
    return ExitCode.OK


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
    from training.webhooks import start_webhooks

    scheduler = start_prune_scheduler(realm, config) if config.retention.enabled else None
    webhooks = start_webhooks(realm, config)
    try:
        roles = ("daemon",) if args.no_tavern else ("daemon", "tavern")
        try:
            launcher = _launcher(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.CONFIG
        return Supervisor(realm, config, roles=roles, environ=environ, launcher=launcher).run()
    except AlreadySupervised as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ALREADY_RUNNING
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if webhooks is not None:
            webhooks.stop()
        remove_pid(realm, SUPERVISOR, os.getpid())  # start-all wrote it; nothing if run in the foreground


def cmd_vault(args, realm: Realm, config: RealmConfig, environ) -> int:
    from training.vault_cli import run_vault_command

    return run_vault_command(args, realm, config)


COMMANDS = {
    "config": cmd_config, "daemon": cmd_daemon, "tavern": cmd_tavern, "start-all": cmd_start_all,
    "stop-all": cmd_stop_all, "status": cmd_status, "validate": cmd_validate, "eval": cmd_eval, "enqueue": cmd_enqueue,
    "new-hero": cmd_new_hero, "doctor": cmd_doctor, "supervise": cmd_supervise, "vault": cmd_vault, **{c: cmd_control for c in CONTROL_COMMANDS},
    "export": export_cli.cmd_export, "chat": export_cli.cmd_chat,
    "trial": skills_cli.cmd_trial, "spar": skills_cli.cmd_spar, "skills": skills_cli.cmd_skills,
}

"""A realm: one folder holding a hero's config, data folders, checkpoints, logs and ledger.

Layout::

    <realm>/config.json
    <realm>/inbox/{high,normal,low}/      files dropped by the user
    <realm>/queue/{validating,high,normal,low,processing,recently_completed,failed,trash}/
    <realm>/models/<hero>/base/           the embedded default hero, when one was created
    <realm>/models/<hero>/checkpoints/step-00001234/
    <realm>/logs/                         daemon.log, tavern.log
    <realm>/run/                          pid files, lock files (DAEMON_LOCK, SUPERVISOR_LOCK, PRUNE_LOCK,
                                          START_ALL_LOCK, WEBHOOKS_LOCK)
    <realm>/runs/<hero>/                  experiment tracker logs (training.report_to, e.g. TensorBoard)
    <realm>/ledger.sqlite                 the SQLite ledger (WAL)

The repository root is the default realm; ``--realm DIR`` or ``REALM_HOME`` selects another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.config import CONFIG_FILENAME, RealmConfig, load_config, parse_config, read_config_data

PRIORITIES = ("high", "normal", "low")
QUEUE_FOLDERS = ("validating", *PRIORITIES, "processing", "recently_completed", "failed", "trash")
REALM_ENV = "REALM_HOME"
# lock files under run/ (core.fsutil.ExclusiveLock): one daemon, one supervisor, one prune, one start-all
# at a time; a version restore holds DAEMON_LOCK so no daemon starts meanwhile
DAEMON_LOCK = "daemon.lock"
SUPERVISOR_LOCK = "supervisor.lock"
PRUNE_LOCK = "prune.lock"
START_ALL_LOCK = "start-all.lock"
WEBHOOKS_LOCK = "webhooks.lock"  # one webhook dispatcher per realm (core.webhooks)


class RealmError(RuntimeError):
    """Raised when a path escapes the realm or the realm cannot be created."""


@dataclass(frozen=True)
class Realm:
    """Paths of one realm. All paths are absolute."""

    root: Path

    @classmethod
    def at(cls, root: Path | str) -> Realm:
        return cls(Path(root).expanduser().resolve())

    # folders -----------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILENAME

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    def queue_dir(self, name: str) -> Path:
        if name not in QUEUE_FOLDERS:
            raise ValueError(f"unknown queue folder {name!r}")
        return self.queue / name

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    def hero_dir(self, hero_name: str) -> Path:
        return self.models / hero_name

    def checkpoints_dir(self, hero_name: str) -> Path:
        return self.hero_dir(hero_name) / "checkpoints"

    def versions_dir(self, hero_name: str) -> Path:
        """``models/<hero>/versions``: the hero's named versions (``management.versions``)."""
        return self.hero_dir(hero_name) / "versions"

    def pid_file(self, process_name: str) -> Path:
        return self.run_dir / f"{process_name}.pid"

    def lock_file(self, lock_name: str) -> Path:
        """``run/<lock_name>``, one of :data:`DAEMON_LOCK`, :data:`SUPERVISOR_LOCK`, :data:`PRUNE_LOCK`,
        :data:`START_ALL_LOCK`, :data:`WEBHOOKS_LOCK`."""
        if lock_name not in (DAEMON_LOCK, SUPERVISOR_LOCK, PRUNE_LOCK, START_ALL_LOCK, WEBHOOKS_LOCK):
            raise ValueError(f"unknown lock {lock_name!r}")
        return self.run_dir / lock_name

    # behaviour ---------------------------------------------------------------
    def load_config(self) -> RealmConfig:
        """Raises :class:`core.config.ConfigError` when config.json is invalid."""
        return load_config(self.config_path)

    def ensure_layout(self) -> None:
        """Create every folder of the realm (idempotent)."""
        for d in (self.inbox, *(self.inbox / p for p in PRIORITIES), self.models, self.logs, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        for name in QUEUE_FOLDERS:
            self.queue_dir(name).mkdir(parents=True, exist_ok=True)

    def confine(self, path: Path | str) -> Path:
        """Resolve ``path`` (relative to the realm root) and refuse anything outside the realm.

        Raises :class:`RealmError` on traversal (``..``, absolute paths elsewhere, symlinks out).
        """
        p = Path(path)
        resolved = (p if p.is_absolute() else self.root / p).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise RealmError(f"path {str(path)!r} is outside the realm {self.root}")
        return resolved

    def resolve_base_model(self, base_model: str) -> str:
        """A base_model relative to the realm (``./x``, ``../x``, ``x/y`` that exists) becomes absolute;
        anything else (a hub id) is returned unchanged."""
        p = Path(base_model).expanduser()
        candidate = p if p.is_absolute() else self.root / p
        if candidate.exists():
            return str(candidate.resolve())
        return base_model


def default_realm_root(environ: Mapping[str, str] | None = None) -> Path:
    """``REALM_HOME`` if set, else the repository root (the folder holding this package)."""
    env = os.environ if environ is None else environ
    if env.get(REALM_ENV):
        return Path(env[REALM_ENV]).expanduser().resolve()
    return Path(__file__).resolve().parent.parent


def init_realm(root: Path | str, base_model: str | None = None, overrides: dict | None = None) -> Realm:
    """Create a realm folder with its layout and a ``config.json`` (an existing config is kept, with
    ``hero.base_model`` updated when given). Returns the :class:`Realm`.

    Raises :class:`core.config.ConfigError` when the existing or resulting config is invalid (nothing is
    written then).
    """
    realm = Realm.at(root)
    data: dict = read_config_data(realm.config_path) or {}
    parse_config(data, str(realm.config_path))  # an invalid config already there is not edited
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    if base_model is not None:
        data.setdefault("hero", {})["base_model"] = base_model
    parse_config(data, str(realm.config_path))  # refuse to write an invalid config
    realm.root.mkdir(parents=True, exist_ok=True)
    realm.ensure_layout()
    realm.config_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return realm

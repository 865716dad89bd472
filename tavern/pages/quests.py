"""The quests page and its JSON API (blueprint ``quests``).

Routes (state-changing ones are POST only; errors are ``{"error": message}``):

- ``GET /quests`` — the page (data comes from the API; the page script listens for ``quest`` socket events).
- ``GET /api/quests`` — ``{"counts": {state: n, "queued_high": n, ...}, "quests": [quest...],
  "inbox": [{"name", "priority", "size_bytes"}], "max_upload_bytes": int}``. Quests in validating, queued,
  processing and failed are all listed; completed, skipped and removed ones only the newest
  :data:`RECENT_LIMIT` of each.
- ``GET /api/quests/<id>`` — ``{"quest", "report": {"report", "problem"}, "preview": {"lines", "problem"}}``.
- ``POST /api/quests/upload`` — multipart ``file`` and ``priority``; 201 ``{"name", "priority", "path"}``.
- ``POST /api/quests/<id>/priority`` — ``{"priority": "high"|"normal"|"low"}`` for a queued quest.
- ``POST /api/quests/<id>/retry`` — a quest failed *in training* goes back to the queue (attempts reset).
- ``POST /api/quests/<id>/remove`` — a queued or failed quest goes to ``queue/trash/`` (kept, not deleted).
- ``POST /api/quests/<id>/restore`` — a removed quest that had passed validation is queued again.

Every state change goes through :meth:`core.quest_queue.QuestQueue.transition` with ``expect`` set to the
state the user saw, so a race with the daemon answers 409 instead of doing something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, jsonify, render_template, request
from werkzeug.exceptions import RequestEntityTooLarge

from core.formats import EVERY_FORMAT, PREFERENCE_FORMATS, SFT_FORMATS
from core.ledger import QuestState
from core.quest_queue import QuestStateError, folder_name
from core.realm import PRIORITIES, RealmError
from core.schools import SCHOOL_TITLES, school_by_format
from tavern.context import current_config, current_ledger, current_queue, current_realm
from tavern.pages.quest_files import UploadError, list_inbox, read_preview, read_report, save_upload
from tavern.security import refuse

bp = Blueprint("quests", __name__)

RECENT_LIMIT = 100
#: The school a format waits for when the daemon does not train it yet.
SCHOOL_OF_FORMAT = {fmt: "DPO" for fmt in PREFERENCE_FORMATS}
PUBLIC_FIELDS = (
    "id", "name", "state", "priority", "attempts", "format", "size_bytes", "records", "bad_records",
    "examples_total", "examples_trained", "tokens", "steps", "first_global_step", "last_global_step", "note",
    "error", "deferred", "created_at", "updated_at", "started_at", "finished_at", "source_url", "source_sha256",
)


def passed_validation(quest: dict[str, Any]) -> bool:
    """True when the quest's file was accepted by validation: it has a format, and either the daemon
    counted training attempts or no error was recorded (validation refusals record one, with 0 attempts)."""
    return bool(quest["format"]) and ((quest["attempts"] or 0) > 0 or not quest["error"])


def failure_kind(quest: dict[str, Any]) -> str | None:
    """``"training"`` for a failed quest whose training raised, ``"validation"`` for one refused before
    training (bad records, unreadable file), None when the quest is not failed."""
    if quest["state"] != QuestState.FAILED.value:
        return None
    return "training" if passed_validation(quest) else "validation"


def trainable_formats() -> frozenset[str]:
    """Formats the daemon trains: ``trainable_formats`` of its ledger status when it publishes them, else
    every format (each has a school, :mod:`core.schools`)."""
    published = current_ledger().daemon_status().get("trainable_formats")
    if isinstance(published, list) and all(isinstance(f, str) for f in published):
        return frozenset(published)
    return frozenset(EVERY_FORMAT)


def public_quest(quest: dict[str, Any], trainable: frozenset[str] = SFT_FORMATS) -> dict[str, Any]:
    """A ledger row as the page shows it, with ``waiting_for`` (the school a queued quest waits for, or
    None), ``failure`` and the ``actions`` that apply now."""
    out = {k: quest.get(k) for k in PUBLIC_FIELDS}
    state = QuestState(quest["state"])
    waiting = state == QuestState.QUEUED and quest["format"] and quest["format"] not in trainable
    out["waiting_for"] = SCHOOL_OF_FORMAT.get(quest["format"], "a school") if waiting else None
    out["school"] = quest.get("school") or (school_by_format(quest["format"]) if quest["format"] else None)
    out["school_title"] = SCHOOL_TITLES.get(out["school"] or "")
    out["failure"] = failure_kind(quest)
    out["actions"] = [action for action, ok in (
        ("priority", state == QuestState.QUEUED),
        ("retry", out["failure"] == "training"),
        ("remove", state in (QuestState.QUEUED, QuestState.FAILED)),
        ("restore", state == QuestState.REMOVED and passed_validation(quest)),
    ) if ok]
    return out


def _quest_rows() -> list[dict[str, Any]]:
    ledger = current_ledger()
    active = [QuestState.VALIDATING, QuestState.QUEUED, QuestState.PROCESSING, QuestState.FAILED]
    rows = ledger.list_quests(active, limit=100_000)
    for state in (QuestState.COMPLETED, QuestState.SKIPPED, QuestState.REMOVED):
        rows += ledger.recent_quests(state, RECENT_LIMIT)
    return rows


def _quest_files(quest: dict[str, Any]) -> tuple[Path, Path]:
    """(data file, report file) of ``quest``, resolved, if they lie directly in the quest's queue folder
    inside the realm; else :class:`core.realm.RealmError` (answered 403 by the app). Guards against a
    stored name with separators or ``..`` (a tampered ledger)."""
    realm, queue = current_realm(), current_queue()
    folder = realm.confine(realm.queue_dir(folder_name(QuestState(quest["state"]), quest["priority"])))
    paths = (realm.confine(queue.path_of(quest)), realm.confine(queue.report_path_of(quest)))
    if any(p.parent != folder for p in paths):
        raise RealmError(f"quest {quest['id']}: its stored file name is not a plain name")
    return paths


def _get(quest_id: int) -> dict[str, Any] | None:
    return current_ledger().get_quest(quest_id)


@bp.get("/quests")
def index():
    return render_template("quests.html", priorities=PRIORITIES,
                           max_upload_bytes=current_config().tavern.max_upload_bytes,
                           max_download_bytes=current_config().sources.max_download_bytes)


@bp.get("/api/quests")
def api_list():
    ledger = current_ledger()
    counts: dict[str, int] = ledger.queue_counts()
    for priority, n in ledger.queued_counts_by_priority().items():
        counts[f"queued_{priority}"] = n
    for p in PRIORITIES:
        counts.setdefault(f"queued_{p}", 0)
    trainable = trainable_formats()
    quests = [public_quest(r, trainable) for r in _quest_rows()]
    counts["waiting"] = sum(1 for q in quests if q["waiting_for"])
    return jsonify(counts=counts, quests=quests,
                   inbox=list_inbox(current_realm().inbox),
                   max_upload_bytes=current_config().tavern.max_upload_bytes)


@bp.get("/api/quests/<int:quest_id>")
def api_detail(quest_id: int):
    quest = _get(quest_id)
    if quest is None:
        return refuse(404, f"no quest {quest_id}")
    realm = current_realm()
    data_path, report_path = _quest_files(quest)
    return jsonify(quest=public_quest(quest, trainable_formats()), report=read_report(report_path),
                   preview=read_preview(data_path), file=str(data_path.relative_to(realm.root)))


@bp.post("/api/quests/upload")
def api_upload():
    limit = current_config().tavern.max_upload_bytes
    try:
        if request.content_length is not None and request.content_length > limit + 64 * 1024:
            raise RequestEntityTooLarge()
        upload = request.files.get("file")
        priority = request.form.get("priority", "normal")
    except RequestEntityTooLarge:
        return refuse(413, f"the upload is larger than the limit of {limit} bytes (tavern.max_upload_bytes)")
    if upload is None:
        return refuse(400, "no file in the upload (multipart field 'file')")
    try:
        path = save_upload(upload.stream, upload.filename or "", priority, current_realm().inbox, limit)
    except UploadError as exc:
        return refuse(exc.status, str(exc))
    realm = current_realm()
    current_ledger().event("quest_uploaded", f"{path.name} uploaded into the inbox ({priority})",
                           name=path.name, priority=priority, size_bytes=path.stat().st_size)
    resp = jsonify(name=path.name, priority=priority, path=str(path.relative_to(realm.root)))
    resp.status_code = 201
    return resp


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if isinstance(data, dict):
        return data
    return request.form.to_dict()


def _transition(quest_id: int, to_state: QuestState, expect: QuestState, event: str, message: str,
                **kwargs: Any):
    try:
        row = current_queue().transition(quest_id, to_state, expect=expect, **kwargs)
    except QuestStateError as exc:
        return refuse(409, f"{exc} (the page was out of date; it has been refreshed)")
    except FileNotFoundError:
        return refuse(409, f"the file of quest {quest_id} is missing from its queue folder")
    except FileExistsError as exc:
        return refuse(409, str(exc))
    current_ledger().event(event, message, quest_id=quest_id)
    return jsonify(quest=public_quest(row, trainable_formats()))


@bp.post("/api/quests/<int:quest_id>/priority")
def api_priority(quest_id: int):
    priority = _body().get("priority")
    if priority not in PRIORITIES:
        return refuse(400, f"priority must be one of {', '.join(PRIORITIES)}")
    quest = _get(quest_id)
    if quest is None:
        return refuse(404, f"no quest {quest_id}")
    if quest["state"] != QuestState.QUEUED.value:
        return refuse(409, f"only queued quests change priority; quest {quest_id} is {quest['state']}")
    return _transition(quest_id, QuestState.QUEUED, QuestState.QUEUED, "quest_priority",
                       f"{quest['name']}: priority {quest['priority']} -> {priority}", priority=priority)


@bp.post("/api/quests/<int:quest_id>/retry")
def api_retry(quest_id: int):
    quest = _get(quest_id)
    if quest is None:
        return refuse(404, f"no quest {quest_id}")
    kind = failure_kind(quest)
    if kind is None:
        return refuse(409, f"only failed quests can be retried; quest {quest_id} is {quest['state']}")
    if kind == "validation":
        return refuse(409, "this file failed validation, so training it again would fail the same way: "
                      "read its report, fix the file and drop it into the inbox again")
    return _transition(quest_id, QuestState.QUEUED, QuestState.FAILED, "quest_retry_requested",
                       f"{quest['name']} queued again by the user after {quest['attempts']} failed attempts",
                       attempts=0, error=None, finished_at=None,
                       note=f"retried after: {quest['error'] or 'an error'}"[:500])


@bp.post("/api/quests/<int:quest_id>/remove")
def api_remove(quest_id: int):
    quest = _get(quest_id)
    if quest is None:
        return refuse(404, f"no quest {quest_id}")
    if quest["state"] not in (QuestState.QUEUED.value, QuestState.FAILED.value):
        return refuse(409, f"only queued or failed quests can be removed; quest {quest_id} is {quest['state']}")
    return _transition(quest_id, QuestState.REMOVED, QuestState(quest["state"]), "quest_removed",
                       f"{quest['name']} removed by the user (kept in queue/trash/)")


@bp.post("/api/quests/<int:quest_id>/restore")
def api_restore(quest_id: int):
    quest = _get(quest_id)
    if quest is None:
        return refuse(404, f"no quest {quest_id}")
    if "restore" not in public_quest(quest)["actions"]:
        return refuse(409, f"quest {quest_id} cannot be restored (only removed quests that passed validation)")
    return _transition(quest_id, QuestState.QUEUED, QuestState.REMOVED, "quest_restored",
                       f"{quest['name']} restored from the trash into the queue", attempts=0, error=None,
                       finished_at=None)

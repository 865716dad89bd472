"""Whisper's teacher: which model folder a ``teacher`` setting names, and whether its tokenizer is the hero's.

Validation and the CLI's ``validate`` run it: importing it costs no torch, and a check loads the teacher's
tokenizer (transformers) and reads its ``config.json``, never its weights.
:mod:`core.schools.whisper` loads the teacher's weights once per quest through :func:`resolve_teacher`.

``schools.<glob>.teacher`` (:class:`core.config.QuestRule`) is tried as, in this order:

1. a checkpoint of the hero: ``step-00001234`` or the bare global step ``1234``
   (:func:`core.checkpoint_layout.parse_step_argument`), in ``models/<hero>/checkpoints/``;
2. a named version of the hero (``models/<hero>/versions/<name>``, ``python -m training promote``);
3. a local model folder (absolute, ``~``, or relative to the realm), holding ``config.json`` (or a PEFT
   adapter checkpoint, loaded as its base with the adapter merged);
4. a hub id in the local Hugging Face cache (``local_files_only``: nothing is ever downloaded).

``latest`` and ``best`` are refused: they move while the hero trains, so the teacher of a quest would
change under it (and a resume would distil from other weights). Name the checkpoint, or promote it to a
version (a checkpoint may be pruned by retention; a version stays).

**Same tokenizer.** The teacher's logits are compared with the hero's position by position, so both must
split text into the same token ids: the teacher's tokenizer must have the hero's vocabulary (every token
string with the same id) and encode a probe text (ASCII, digits, punctuation, accents, CJK, emoji,
newlines) to the same ids; its model must have at least as many output logits as the hero's tokenizer has
tokens. Anything else is a :class:`TeacherError` naming what differs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.checkpoint_layout import (
    ADAPTER_CONFIG_FILE,
    EXAMPLE_NAME,
    MODEL_CONFIG_FILE,
    VERSION_NAME_RE,
    checkpoint_name,
    list_checkpoints,
    parse_step_argument,
)
from core.config import QuestRule, RealmConfig
from core.realm import Realm

MOVING_TAGS = ("latest", "best")
PROBE_TEXT = ("Once upon a time, Lily (age 7) said: \"Hello, world!\" 12345 + 678 = 13023.\n"
              "\tnaïve café – déjà vu; 東京 🚀\n  two  spaces")
"""Encoded by both tokenizers: the same ids or a :class:`TeacherError`."""


class TeacherError(ValueError):
    """The teacher cannot be used: not configured, not found, not a model, or another tokenizer."""


def resolve_teacher(realm: Realm, config: RealmConfig, spec: str | None) -> tuple[Path, str]:
    """``(model folder, what it is)`` for a ``teacher`` setting (see the module doc for the order tried);
    ``what`` is e.g. ``"checkpoint step-00000040"``. Raises :class:`TeacherError` with the fix."""
    from core.hero import HeroError, _from_hub_cache

    spec = (spec or "").strip()
    if not spec:
        raise TeacherError("school distill (Whisper) needs a teacher: set schools.<glob>.teacher in config.json")
    hero = config.hero.name
    if spec in MOVING_TAGS:
        raise TeacherError(f"teacher {spec!r} moves while the hero trains (the teacher of a quest must stay "
                           f"fixed): name the checkpoint (e.g. {EXAMPLE_NAME}) or promote it to a version")
    try:
        step = parse_step_argument(spec)
    except ValueError:
        step = None
    if step is not None:
        found = [p for p in list_checkpoints(realm.checkpoints_dir(hero)) if p.name == checkpoint_name(step)]
        if not found:
            have = [p.name for p in list_checkpoints(realm.checkpoints_dir(hero))][-5:]
            raise TeacherError(f"teacher {spec!r}: hero {hero!r} has no checkpoint at global step {step} "
                               f"(newest: {', '.join(have) or 'none'})")
        return found[0], f"checkpoint {found[0].name}"
    if VERSION_NAME_RE.fullmatch(spec) and (realm.versions_dir(hero) / spec).is_dir():
        return _model_folder(realm.versions_dir(hero) / spec, spec), f"version {spec}"
    path = Path(spec).expanduser()
    candidate = path if path.is_absolute() else realm.root / path
    if candidate.exists() or path.is_absolute() or spec.startswith((".", "~")):
        if not candidate.is_dir():
            raise TeacherError(f"teacher {spec!r}: folder {candidate} does not exist")
        return _model_folder(candidate.resolve(), spec), f"folder {candidate.resolve()}"
    try:
        return _model_folder(Path(_from_hub_cache(spec, realm, "teacher")), spec), f"cached hub model {spec}"
    except HeroError as exc:
        raise TeacherError(str(exc)) from None


def _model_folder(folder: Path, spec: str) -> Path:
    if not ((folder / MODEL_CONFIG_FILE).is_file() or (folder / ADAPTER_CONFIG_FILE).is_file()):
        raise TeacherError(f"teacher {spec!r}: {folder} has no {MODEL_CONFIG_FILE}; it must be a Hugging Face "
                           "model folder (save_pretrained output) or a checkpoint")
    return folder


def tokenizer_problem(hero_tokenizer: Any, teacher_tokenizer: Any) -> str | None:
    """Why ``teacher_tokenizer`` does not tokenize as ``hero_tokenizer`` (None when it does): vocabulary
    size, the first token string whose id differs, or the probe text's ids (:data:`PROBE_TEXT`)."""
    mine, theirs = hero_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if mine != theirs:
        if len(mine) != len(theirs):
            return f"its vocabulary has {len(theirs):,} tokens, the hero's {len(mine):,}"
        token = next(t for t in sorted(mine) if theirs.get(t) != mine[t])
        return f"token {token!r} is id {mine[token]} for the hero but {theirs.get(token)} for the teacher"
    a = hero_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    b = teacher_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if a != b:
        return f"the same vocabulary, but it splits text differently ({len(b)} tokens for the hero's {len(a)})"
    return None


def teacher_problem(realm: Realm, config: RealmConfig, rule: QuestRule, hero_tokenizer: Any) -> str | None:
    """Why the teacher of ``rule`` cannot teach a hero with ``hero_tokenizer`` (None when it can): it does
    not resolve (:func:`resolve_teacher`), its tokenizer does not load or differs
    (:func:`tokenizer_problem`), or its model has fewer output logits (``vocab_size``) than the tokenizer
    has tokens. Loads the teacher's tokenizer and reads its ``config.json``; no weights."""
    import json

    from core.hero import HeroError, load_tokenizer

    try:
        folder, what = resolve_teacher(realm, config, rule.teacher)
        tokenizer = load_tokenizer(folder, config.hero)
    except (TeacherError, HeroError) as exc:
        return str(exc)
    problem = tokenizer_problem(hero_tokenizer, tokenizer)
    if problem:
        return (f"teacher {rule.teacher!r} ({what}) has another tokenizer than the hero: {problem}; the teacher "
                "must tokenize exactly as the hero (the same model family and tokenizer)")
    try:
        vocab_size = json.loads((folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        vocab_size = None  # an adapter checkpoint: its base model's config (checked when loaded)
    if isinstance(vocab_size, int) and vocab_size < len(hero_tokenizer):
        return (f"teacher {rule.teacher!r} ({what}) has {vocab_size:,} output logits, fewer than the "
                f"{len(hero_tokenizer):,} tokens of the hero's tokenizer")
    return None


def school_check(realm: Realm, config: RealmConfig, hero_tokenizer: Any) -> Callable[[str, QuestRule], str | None]:
    """A ``school_check`` for :func:`core.validation.validate_file`: the teacher's problem for school
    ``distill`` (:func:`teacher_problem`), None for the other schools."""

    def check(school: str, rule: QuestRule) -> str | None:
        if school != "distill" or not rule.teacher:
            return None
        return teacher_problem(realm, config, rule, hero_tokenizer)

    return check

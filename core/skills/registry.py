"""All the skills of a realm, built from its config: built-ins, dataset skills, custom skills.

:func:`build_registry` never raises for a broken skill: each problem becomes a :class:`SkillLoadError`
in :attr:`SkillRegistry.errors` (a dataset file that cannot be read, a custom file that does not import,
a name taken twice, a name in ``skills.priorities`` that no skill has), and the other skills work.
Callers show the errors: :func:`report_errors` stores them in the ledger (``status --json``
``skill_errors``) with a ``skill_error`` warning event when they change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.config import SkillsConfig
from core.skills.base import Skill, SkillError
from core.skills.binary import BinarySkill
from core.skills.custom import load_custom_skill, skill_files
from core.skills.dataset import DatasetSkill
from core.skills.letters import LettersSkill

BUILTIN_SKILLS: tuple[type[Skill], ...] = (BinarySkill, LettersSkill)


@dataclass(frozen=True)
class SkillLoadError:
    """A skill that could not be loaded: ``source`` (``skills/x.py``, ``skills.datasets.NAME`` or
    ``skills.priorities``) and the reason."""

    source: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SkillRegistry:
    """Skills by name, and the problems met building them."""

    skills: dict[str, Skill] = field(default_factory=dict)
    errors: list[SkillLoadError] = field(default_factory=list)
    priorities: dict[str, float] = field(default_factory=dict)
    """``skills.priorities`` restricted to skills that exist, with a weight > 0."""

    def get(self, name: str) -> Skill:
        """The skill called ``name``. Raises :class:`SkillError` naming the skills there are."""
        skill = self.skills.get(name)
        if skill is None:
            broken = [e for e in self.errors if e.source.endswith((f"/{name.lower()}.py", f".{name}"))]
            why = f" ({broken[0].message.splitlines()[-1]})" if broken else ""
            raise SkillError(f"no skill named {name!r}{why}; skills: {', '.join(self.skills) or 'none'}")
        return skill

    def __contains__(self, name: str) -> bool:
        return name in self.skills


def build_registry(realm_root: Path | str, config: SkillsConfig) -> SkillRegistry:
    """Built-in skills, then ``config.datasets``, then ``<realm>/skills/*.py`` (see the module doc)."""
    registry = SkillRegistry()

    def add(skill: Skill, source: str) -> None:
        if skill.name in registry.skills:
            registry.errors.append(SkillLoadError(source, f"skill name {skill.name!r} is already taken by "
                                                  f"{type(registry.skills[skill.name]).__name__}; rename it"))
        else:
            registry.skills[skill.name] = skill

    for cls in BUILTIN_SKILLS:
        add(cls(), "built-in")
    for name, dataset in config.datasets.items():
        try:
            skill = DatasetSkill(name, dataset, realm_root)
        except SkillError as exc:
            registry.errors.append(SkillLoadError(f"skills.datasets.{name}", str(exc)))
            continue
        if skill.skipped_count:
            registry.errors.append(SkillLoadError(f"skills.datasets.{name}", f"{skill.skipped_count} record(s) "
                                                  f"skipped: {'; '.join(skill.skipped[:3])}"))
        add(skill, f"skills.datasets.{name}")
    for path in skill_files(realm_root):
        source = f"skills/{path.name}"
        try:
            add(load_custom_skill(path), source)
        except SkillError as exc:
            registry.errors.append(SkillLoadError(source, str(exc)))
    for name, weight in config.priorities.items():
        if name not in registry.skills:
            registry.errors.append(SkillLoadError("skills.priorities", f"no skill named {name!r}; skills: "
                                                  f"{', '.join(registry.skills)}"))
        elif weight > 0:
            registry.priorities[name] = weight
    return registry


def report_errors(ledger, registry: SkillRegistry) -> None:
    """Store ``registry.errors`` in the ledger (:meth:`core.ledger.Ledger.set_skill_load_errors`); a
    ``skill_error`` warning event for each error that was not there before."""
    ledger.set_skill_load_errors([e.to_dict() for e in registry.errors])

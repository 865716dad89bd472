"""Skills the hero has, with levels earned in promotion trials.

A skill (:class:`core.skills.base.Skill`) draws ``(prompt, answer)`` items at a level from a seeded
``random.Random`` and scores an answer exactly. Built in: ``BIN`` (:mod:`core.skills.binary`), ``LETTERS``
(:mod:`core.skills.letters`); from config: dataset skills (:mod:`core.skills.dataset`); from the realm's
``skills/`` folder: custom skills (:mod:`core.skills.custom`). :func:`core.skills.registry.build_registry`
gathers them; :mod:`core.skills.quests` turns items into SFT quest records; :mod:`core.skills.trials` runs
promotion trials (Wilson lower bound, :mod:`core.skills.stats`).

This package imports no torch except :mod:`core.skills.trials`; import the submodules you need.
"""

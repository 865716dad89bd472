"""The hero's tokenizer for commands that do not train (validate, doctor), without creating anything."""

from __future__ import annotations

from core.config import RealmConfig
from core.realm import Realm


def hero_tokenizer(realm: Realm, config: RealmConfig):
    """The tokenizer the daemon would train with: the latest checkpoint's, else the base model's, else
    the embedded default's (built in memory when the default hero does not exist yet).

    Raises :class:`core.hero.HeroError` when a configured base model cannot be found.
    """
    from core.checkpoint_layout import latest_checkpoint
    from core.hero import build_byte_tokenizer, default_hero_dir, load_tokenizer, resolve_model_source

    checkpoint = latest_checkpoint(realm.checkpoints_dir(config.hero.name))
    if checkpoint is not None:
        return load_tokenizer(checkpoint, config.hero)
    if config.hero.base_model is None and not (default_hero_dir(realm, config.hero) / "config.json").exists():
        tokenizer = build_byte_tokenizer()
        if config.hero.chat_template is not None:
            tokenizer.chat_template = config.hero.chat_template
        return tokenizer
    source, _ = resolve_model_source(realm, config.hero, create=False)
    return load_tokenizer(source, config.hero)

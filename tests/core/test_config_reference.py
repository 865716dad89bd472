"""The README's config reference names types as a reader writes them."""

from typing import Literal

import pytest
from pydantic import BaseModel

from core.config import RealmConfig, config_reference_markdown, config_sections, type_name


class _Inner(BaseModel):
    x: int = 0


@pytest.mark.parametrize("annotation,expected", [
    (str, "str"), (int, "int"), (float, "float"), (bool, "bool"),
    (str | None, "str | None"), (int | float, "int | float"),
    (Literal["nano", "micro"], "Literal['nano', 'micro']"), (Literal[1, None], "Literal[1, None]"),
    (dict[str, dict[str, str]], "dict[str, dict[str, str]]"), (list[str], "list[str]"),
    (list[str] | None, "list[str] | None"), (dict[str, list[int | None]], "dict[str, list[int | None]]"),
    (_Inner, "_Inner"), (_Inner | None, "_Inner | None"),
])
def test_type_names(annotation, expected):
    assert type_name(annotation) == expected


def test_reference_has_no_python_reprs_and_covers_every_key():
    text = config_reference_markdown()
    assert "<class" not in text and "typing." not in text
    sections = config_sections()
    suffix = {"webhooks": "[]", "schools": ".<glob>"}
    assert [name for name, _ in sections] == [n + suffix.get(n, "") for n in RealmConfig.model_fields]

    def rows(model, prefix=""):  # a nested section (training.lora) is one row per dotted sub-key
        for key, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                yield from rows(f.annotation, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", type_name(f.annotation).replace("|", "\\|")

    for section, model in sections:
        assert f"#### `{section}`" in text
        for key, rendered in rows(model):
            assert f"| `{key}` | `{rendered}` |" in text, (section, key)
    assert "| `lora.r` | `int` |" in text and "| `lora.target_modules` | `list[str] \\| None` |" in text
    assert "| `name` | `str` |" in text and "| `port` | `int` |" in text
    assert "| `learning_rate` | `float` |" in text and "| `packing` | `bool` |" in text
    assert "| `base_model` | `str \\| None` |" in text

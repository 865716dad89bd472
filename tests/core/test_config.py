import json

import pytest

from core.config import ConfigError, config_json_schema, config_reference_markdown, load_config, parse_config


def test_defaults_when_missing(tmp_path):
    cfg = load_config(tmp_path / "config.json")
    assert cfg.training.learning_rate > 0
    assert cfg.tavern.host == "127.0.0.1"
    assert cfg.hero.base_model is None


def test_every_error_reported_at_once_with_its_key():
    with pytest.raises(ConfigError) as info:
        parse_config({"training": {"learning_rate": -1, "bogus": 1, "max_length": "long"},
                      "tavern": {"port": 70000}, "extra": {}})
    errors = info.value.errors
    keys = {e.split(":")[0] for e in errors}
    assert keys == {"training.learning_rate", "training.bogus", "training.max_length", "tavern.port", "extra"}
    assert any(e == "training.bogus: unknown key" for e in errors)


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{\n  "training": {\n    "learning_rate": 1e-3,\n  }\n}')
    with pytest.raises(ConfigError, match="line 4"):
        load_config(p)


def test_field_map_and_roundtrip(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"validation": {"field_map": {"gsm8k*.jsonl": {"question": "prompt"}}}}))
    assert load_config(p).validation.field_map == {"gsm8k*.jsonl": {"question": "prompt"}}


def test_schema_and_reference_cover_every_section():
    schema = config_json_schema()
    assert set(schema["properties"]) == {"hero", "training", "ingest", "validation", "tavern", "retention",
                                         "backup", "supervisor", "skills"}
    ref = config_reference_markdown()
    for key in ("learning_rate", "max_length", "save_steps", "settle_seconds", "length_policy", "access_token",
                "keep_last", "min_free_gb", "hang_minutes"):
        assert f"`{key}`" in ref


# --- skills (issue 10) -------------------------------------------------------------------------------------
def test_skills_defaults_and_schema():
    skills = parse_config({}).skills
    assert skills.priorities == {"BIN": 1.0} and skills.trial_samples == 50 and skills.promotion_threshold == 0.8
    props = config_json_schema()["$defs"]["SkillsConfig"]["properties"]
    assert {"priorities", "trial_samples", "trial_every_steps", "promotion_threshold", "datasets"} <= set(props)
    assert props["trial_samples"]["minimum"] == 30
    ref = config_reference_markdown()
    assert "#### `skills`" in ref and "`promotion_threshold`" in ref and "`trial_every_steps`" in ref


def test_skills_errors_are_reported_at_once_by_key():
    with pytest.raises(ConfigError) as info:
        parse_config({"skills": {"trial_samples": 29, "priorities": {"BIN": -1, "bad name": 1},
                                 "datasets": {"G": {"path": "g.jsonl", "verifier": "vibes", "extra": 1}, "9": {}}}})
    errors = "\n".join(info.value.errors)
    for needle in ("skills.trial_samples: Input should be greater than or equal to 30",
                   "skills.priorities: Value error, skill name 'bad name'", "weight of 'BIN' must be a finite number",
                   "skills.datasets.G.verifier", "skills.datasets.G.extra: unknown key", "skills.datasets.9.path"):
        assert needle in errors, errors


def test_a_threshold_no_trial_can_reach_is_refused():
    with pytest.raises(ConfigError, match="skills.promotion_threshold: .*0.929"):
        parse_config({"skills": {"promotion_threshold": 0.93}})
    assert parse_config({"skills": {"promotion_threshold": 0.93, "trial_samples": 100}}).skills.trial_samples == 100

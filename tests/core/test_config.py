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
                                         "backup", "supervisor", "sources", "webhooks", "skills",
                                         "idle_generation", "schools", "sparring", "campaign", "feedback"}
    ref = config_reference_markdown()
    for key in ("learning_rate", "max_length", "save_steps", "settle_seconds", "length_policy", "access_token",
                "keep_last", "min_free_gb", "hang_minutes", "report_to", "max_download_bytes", "secret", "epochs",
                "shuffle", "after_failed_trial", "feedback_turn", "preset"):
        assert f"`{key}`" in ref


# hostile config files (issue 8): a ConfigError naming the key, never a traceback ------------------------
@pytest.mark.parametrize("content, problem", [
    (None, "cannot be read: Is a directory"),
    (b'{"training": {"learning_rate": 0.001}}\xff\xfe', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"training": {"learning_rate": 1e-3,}}', "invalid JSON at line 1"),
])
def test_unreadable_config_files_are_config_errors(tmp_path, content, problem):
    p = tmp_path / "config.json"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    with pytest.raises(ConfigError, match=problem) as info:
        load_config(p)
    assert info.value.errors[0].startswith("(file): ")


def test_a_byte_order_mark_is_tolerated(tmp_path):
    p = tmp_path / "config.json"
    p.write_bytes(b'\xef\xbb\xbf{"training": {"save_steps": 7}}')  # as Windows Notepad saves it
    assert load_config(p).training.save_steps == 7


def test_non_finite_numbers_are_refused_by_key(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"training": {"learning_rate": Infinity, "max_grad_norm": NaN},'
                 ' "retention": {"min_free_gb": -Infinity}}')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    keys = sorted(e.split(":")[0] for e in info.value.errors)
    assert keys == ["retention.min_free_gb", "training.learning_rate", "training.max_grad_norm"]
    assert all("finite" in e for e in info.value.errors)


def test_types_are_strict_but_ints_are_floats():
    with pytest.raises(ConfigError) as info:
        parse_config({"training": {"save_steps": True, "micro_batch_size": 2.0, "packing": 1, "warmup_steps": "5",
                                   "learning_rate": "3e-4"},
                      "tavern": {"port": "8888"}, "ingest": {"use_polling": "false"}})
    keys = sorted(e.split(":")[0] for e in info.value.errors)
    assert keys == ["ingest.use_polling", "tavern.port", "training.learning_rate", "training.micro_batch_size",
                    "training.packing", "training.save_steps", "training.warmup_steps"]
    cfg = parse_config({"training": {"learning_rate": 1, "save_interval_minutes": 2}})  # a JSON int is a float
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.save_interval_minutes == 2.0


def test_config_command_output_is_always_valid_json():
    out = json.dumps(parse_config({"training": {"learning_rate": 1}}).model_dump(), allow_nan=False)
    assert json.loads(out)["training"]["learning_rate"] == 1.0


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


def test_schools_rules_first_matching_glob_wins_and_errors_name_the_key():
    from core.config import quest_rule_for

    c = parse_config({"schools": {"gsm8k*": {"epochs": 3, "shuffle": True}, "*.csv": {"epochs": 2}, "*": {}}})
    assert (quest_rule_for("high_gsm8k_train.csv.gz", c.schools).epochs, c.schools["gsm8k*"].shuffle) == (3, True)
    assert quest_rule_for("other.csv", c.schools).epochs == 2 and quest_rule_for("x.txt", c.schools).epochs == 1
    assert quest_rule_for("x.txt", {}).shuffle is False
    with pytest.raises(ConfigError) as exc:
        parse_config({"schools": {"a*": {"epochs": 0, "shuffle": "yes", "order": 1}}})
    assert {e.split(":")[0] for e in exc.value.errors} == {"schools.a*.epochs", "schools.a*.shuffle", "schools.a*.order"}

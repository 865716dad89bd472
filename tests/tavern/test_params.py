"""Hostile numbers and JSON on every Tavern route that reads them: a 4xx naming the parameter, never a 500
(issue 8: an id past SQLite's int64 raised OverflowError inside sqlite3)."""

from __future__ import annotations

import pytest

from tavern.params import SQLITE_INT_MAX, BadParameter, json_int, parse_int

BIG = "99999999999999999999"  # 20 digits: past int64
PROMPT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def csrf(app):
    return {"X-CSRF-Token": app.config["TAVERN_CSRF_TOKEN"]}


@pytest.mark.parametrize("path", [
    f"/api/quests/{BIG}", f"/api/controls/{BIG}", f"/api/quests/{SQLITE_INT_MAX + 1}",
    "/api/quests/" + "9" * 5000, "/api/quests/٣", "/api/controls/１",
])
def test_out_of_range_or_non_ascii_ids_are_unknown(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.get_json()["error"]


def test_the_largest_int64_id_is_looked_up(client):
    r = client.get(f"/api/quests/{SQLITE_INT_MAX}")
    assert r.status_code == 404 and r.get_json()["error"] == f"no quest {SQLITE_INT_MAX}"
    assert client.get(f"/api/controls/{SQLITE_INT_MAX}").get_json()["error"] == f"no command {SQLITE_INT_MAX}"


@pytest.mark.parametrize("path", [
    f"/api/events?since_id={BIG}", f"/api/history?to_step={BIG}", f"/api/history?from_step={BIG}",
    f"/api/oracle/preferences?before_id={BIG}", f"/api/oracle/preferences?limit={BIG}",
    "/api/oracle/preferences?limit=-5", "/api/events?since_id=٣", "/api/events?since_id=1_0",
    "/api/events?since_id=" + "9" * 5000, "/api/history?max_points=%201000",
])
def test_out_of_range_query_integers_are_a_400_naming_the_parameter(client, path):
    r = client.get(path)
    assert r.status_code == 400, r.get_data(as_text=True)
    name = path.split("?")[1].split("=")[0]
    error = r.get_json()["error"]
    assert error.startswith(name) and len(error) < 200  # a 5000-digit value is not echoed back whole


@pytest.mark.parametrize("action", ["priority", "retry", "remove", "restore"])
def test_quest_actions_on_out_of_range_ids_are_404(client, csrf, action):
    r = client.post(f"/api/quests/{BIG}/{action}", headers=csrf, json={"priority": "high"})
    assert r.status_code == 404


def test_preference_delete_and_replaces_out_of_range(client, csrf):
    assert client.post(f"/api/oracle/preferences/{BIG}/delete", headers=csrf).status_code == 404
    for body in ({"checkpoint": "step-00000001", "prompt": PROMPT, "completion": "x", "rating": 1},
                 {"checkpoint": "step-00000001", "prompt": PROMPT, "chosen": "x", "rejected": "y"}):
        kind = "ratings" if "rating" in body else "pairs"
        for replaces in (10**30, -(10**30), True, "3"):
            r = client.post(f"/api/oracle/{kind}", headers=csrf, json={**body, "replaces": replaces})
            assert r.status_code == 400 and "replaces" in r.get_json()["error"], (kind, replaces)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/oracle/ratings", "/api/oracle/pairs",
                                  "/api/quests/1/priority"])
def test_json_nested_beyond_the_parser_is_a_400(client, csrf, path):
    r = client.post(path, headers=csrf, data="[" * 100_000, content_type="application/json")
    assert r.status_code == 400


def test_parsers():
    assert parse_int("-12", "x", lo=-20) == -12 and parse_int(str(SQLITE_INT_MAX), "x") == SQLITE_INT_MAX
    for bad in ("", " 1", "1.0", "0x10", "٣", "1_000", str(SQLITE_INT_MAX + 1), "9" * 30):
        with pytest.raises(BadParameter, match="^x must"):
            parse_int(bad, "x")
    assert json_int(5, "n") == 5
    for bad in (True, 5.0, "5", None, 2**63, -1):
        with pytest.raises(BadParameter, match="^n must"):
            json_int(bad, "n")


def test_the_largest_int64_query_values_are_answered(client):
    for path in (f"/api/history?to_step={SQLITE_INT_MAX}", f"/api/history?from_step=0&to_step={SQLITE_INT_MAX}",
                 f"/api/events?since_id={SQLITE_INT_MAX}", f"/api/oracle/preferences?before_id={SQLITE_INT_MAX}"):
        assert client.get(path).status_code == 200, path

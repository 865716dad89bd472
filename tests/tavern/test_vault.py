"""The vault page: API on real checkpoint folders and a real ledger; pins, exact-name deletion, guards,
path traversal, and a real browser for the delete flow and the screenshot."""

from __future__ import annotations

import json

import pytest

from core.ledger import Ledger
from core.vault import PINNED_KEY
from tests.tavern.conftest import save_screenshot

ORIGIN = {"Origin": "http://localhost"}
HERO = "hero"


@pytest.fixture
def vrealm(tavern_realm):
    return tavern_realm


def make_checkpoint(realm, step, loss=None, eval_loss=None, weights_bytes=2048, hero=HERO):
    """A checkpoint folder as core.checkpoint writes it: weights, config, trainer_state.json."""
    path = realm.checkpoints_dir(hero) / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * weights_bytes)
    (path / "config.json").write_text("{}")
    state = {"global_step": step, "time": 1_760_000_000.0 + step, "loss": loss, "eval_loss": eval_loss,
             "reason": "save_steps", "cursor": {"quest_id": 1, "examples_done": 8 * step, "quest_done": False},
             "hero": {"name": hero}, "config": {}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def post(client, url, **kw):
    return client.post(url, headers=ORIGIN, **kw)


def listing(client):
    return {c["name"]: c for c in client.get("/api/vault").get_json()["checkpoints"]}


def test_list_shows_metrics_tags_and_disk(client, vrealm):
    make_checkpoint(vrealm, 100, loss=2.5, eval_loss=2.7)
    make_checkpoint(vrealm, 200, loss=2.0, eval_loss=2.2)
    make_checkpoint(vrealm, 300, loss=1.9, eval_loss=2.4, weights_bytes=10_000)
    (vrealm.checkpoints_dir(HERO) / ".tmp-step-00000400-77").mkdir()
    data = client.get("/api/vault").get_json()
    assert data["hero"] == HERO and data["pinned"] == []
    assert [c["name"] for c in data["checkpoints"]] == ["step-00000300", "step-00000200", "step-00000100"]
    top = data["checkpoints"][0]
    assert top["step"] == 300 and top["loss"] == 1.9 and top["eval_loss"] == 2.4 and top["tags"] == ["latest"]
    assert top["time"] == 1_760_000_300.0 and top["size_bytes"] > 10_000
    assert data["checkpoints"][1]["tags"] == ["best"]
    disk = data["disk"]
    assert disk["vault_bytes"] >= sum(c["size_bytes"] for c in data["checkpoints"])
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]
    assert client.get("/vault").status_code == 200


def test_pin_and_unpin(client, vrealm):
    make_checkpoint(vrealm, 1, loss=3.0)
    make_checkpoint(vrealm, 2, loss=2.0)
    r = post(client, "/api/vault/checkpoints/step-00000001/pin")
    assert r.status_code == 200 and r.get_json() == {"name": "step-00000001", "pinned": True}
    assert "pinned" in listing(client)["step-00000001"]["tags"]
    other = Ledger(vrealm.ledger_path)  # retention in the daemon reads the same key
    try:
        assert other.get_value(PINNED_KEY) == ["step-00000001"]
    finally:
        other.close()
    assert post(client, "/api/vault/checkpoints/step-00000009/pin").status_code == 404
    assert post(client, "/api/vault/checkpoints/step-00000001/unpin").status_code == 200
    assert "pinned" not in listing(client)["step-00000001"]["tags"]


def test_delete_needs_the_exact_name_and_spares_prefix_matches(client, vrealm):
    make_checkpoint(vrealm, 18, loss=4.0)
    make_checkpoint(vrealm, 180000, loss=3.0)
    make_checkpoint(vrealm, 1800000, loss=2.0)
    make_checkpoint(vrealm, 1900000, loss=1.0)  # latest and best
    url = "/api/vault/checkpoints/step-00000018/delete"
    assert post(client, url).status_code == 400  # no confirmation
    r = post(client, url, json={"confirm": "step-0000001"})
    assert r.status_code == 409 and "exact name" in r.get_json()["error"]
    assert post(client, url, json={"confirm": "STEP-00000018"}).status_code == 409
    assert len(listing(client)) == 4
    r = post(client, url, json={"confirm": "step-00000018"})
    assert r.status_code == 200 and r.get_json()["name"] == "step-00000018"
    assert sorted(listing(client)) == ["step-00180000", "step-01800000", "step-01900000"]
    assert not (vrealm.checkpoints_dir(HERO) / "step-00000018").exists()
    assert post(client, url, json={"confirm": "step-00000018"}).status_code == 404


def test_delete_refuses_latest_best_and_pinned(client, vrealm):
    make_checkpoint(vrealm, 1, loss=1.0)  # best
    make_checkpoint(vrealm, 2, loss=2.0)  # pinned
    make_checkpoint(vrealm, 3, loss=3.0)  # latest
    post(client, "/api/vault/checkpoints/step-00000002/pin")
    for name, why in [("step-00000003", "latest"), ("step-00000001", "best"), ("step-00000002", "pinned")]:
        r = post(client, f"/api/vault/checkpoints/{name}/delete", json={"confirm": name})
        assert r.status_code == 409 and why in r.get_json()["error"], name
    assert len(listing(client)) == 3


def test_vault_path_traversal_is_refused(client, vrealm):
    make_checkpoint(vrealm, 1, loss=1.0)
    make_checkpoint(vrealm, 2, loss=2.0)
    victim = vrealm.root / "config.json"
    assert victim.exists()
    for name in ["..", "..%2F..%2Fconfig.json", "..%2F..%2F..%2Fconfig.json", "step-00000001%2F..%2F..",
                 "step-1", "step-000000010", "%2e%2e", "step-00000001%00"]:
        for action in ("delete", "pin", "unpin"):
            r = post(client, f"/api/vault/checkpoints/{name}/{action}", json={"confirm": name})
            assert r.status_code in (400, 404, 405), (name, action, r.status_code)
    assert victim.exists() and len(listing(client)) == 2
    assert client.get("/api/vault").get_json()["pinned"] == []


def test_vault_changes_are_post_only_and_same_origin(client, vrealm):
    make_checkpoint(vrealm, 1, loss=1.0)
    make_checkpoint(vrealm, 2, loss=2.0)
    assert client.get("/api/vault/checkpoints/step-00000002/delete").status_code == 405
    r = client.post("/api/vault/checkpoints/step-00000002/delete", json={"confirm": "step-00000002"},
                    headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and len(listing(client)) == 2


def test_browser_delete_by_typing_the_name_and_screenshot(live_tavern, page):
    realm = live_tavern.realm
    for step, loss, eval_loss in [(200, 3.1, 3.3), (400, 2.6, 2.9), (600, 2.2, 2.5), (800, 2.0, 2.6),
                                  (1000, 1.9, 2.7)]:
        make_checkpoint(realm, step, loss, eval_loss, weights_bytes=50_000)
    page.goto(live_tavern.url + "/vault")
    page.locator('tr[data-checkpoint="step-00001000"] .badge', has_text="latest").wait_for()
    assert page.locator(".badge.tag-best").count() == 1
    assert page.locator('tr[data-checkpoint="step-00000600"] .badge.tag-best').count() == 1
    assert page.locator('tr[data-checkpoint="step-00000600"] button[data-action="delete"]').count() == 0
    page.locator('tr[data-checkpoint="step-00000400"] button[data-action="pin"]').click()
    page.locator('tr[data-checkpoint="step-00000400"] .badge', has_text="pinned").wait_for()
    page.locator('tr[data-checkpoint="step-00000200"] button[data-action="delete"]').click()
    page.fill("#delete-confirm", "step-0000020")
    assert page.locator("#delete-button").is_disabled()
    page.fill("#delete-confirm", "step-00000200")
    save_screenshot(page, "vault")
    page.click("#delete-button")
    page.locator('tr[data-checkpoint="step-00000200"]').wait_for(state="detached")
    assert not (realm.checkpoints_dir(HERO) / "step-00000200").exists()
    assert (realm.checkpoints_dir(HERO) / "step-00000400").exists()


def test_the_taverns_latest_checkpoint_ignores_unicode_digit_names(tavern_realm):
    from tavern.status import latest_checkpoint
    from tests.core.test_vault import JUNK_STEP_NAMES

    (tavern_realm.checkpoints_dir("hero") / "step-00000003").mkdir(parents=True)
    for name in [*JUNK_STEP_NAMES, "step-٩٩٩٩٩٩٩٩", "step-99999999999"]:
        (tavern_realm.checkpoints_dir("hero") / name).mkdir()
    assert latest_checkpoint(tavern_realm, "hero")["name"] == "step-00000003"

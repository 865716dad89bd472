"""Exports from the Vault page: a background ``python -m training export`` per request, its progress and
result (or failure) through the API, the ``export`` socket event and a real browser, on a hero that really
trained."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from core.realm import Realm
from tests.conftest import wait_for
from tests.tavern.conftest import running_tavern
from tests.trained import trained_realm

ORIGIN = {"Origin": "http://localhost"}
pytestmark = pytest.mark.slow  # each export is a real child process (torch imports, a few seconds)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_realm(tmp_path_factory.mktemp("vault-export") / "realm", base_model=None)


@pytest.fixture
def realm(trained, tmp_path):
    dest = tmp_path / "realm"
    shutil.copytree(trained.root, dest, ignore=shutil.ignore_patterns("*.lock", "*.pid"))
    return Realm.at(dest)


@pytest.fixture
def app(realm):
    from tavern.app import close_app, create_app

    application = create_app(realm, testing=True)
    yield application
    close_app(application)


def latest(realm) -> str:
    return sorted(p.name for p in realm.checkpoints_dir("hero").iterdir() if p.name.startswith("step-"))[-1]


def finished(client, job_id, timeout=240):
    def done():
        jobs = {j["id"]: j for j in client.get("/api/vault/exports").get_json()["jobs"]}
        return jobs[job_id] if jobs[job_id]["state"] != "running" else None

    return wait_for(done, timeout=timeout, what=f"export job {job_id}")


def test_export_job_runs_in_the_background_and_reports_its_path(app, realm):
    client = app.test_client()
    name = latest(realm)
    r = client.post(f"/api/vault/checkpoints/{name}/export", json={"format": "ollama", "quantization": "q8_0"},
                    headers=ORIGIN)
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["state"] == "running" and job["checkpoint"] == name and job["format"] == "ollama"
    busy = client.post(f"/api/vault/checkpoints/{name}/export", json={"format": "hf"}, headers=ORIGIN)
    assert busy.status_code == 409 and "already running" in busy.get_json()["error"]
    job = finished(client, job["id"])
    assert job["state"] == "done" and job["error"] is None and job["progress"] == 1.0
    assert job["path"] == f"exports/hero-{name}-ollama-q8_0/Modelfile"
    assert (realm.root / job["path"]).is_file()
    listing = client.get("/api/vault/exports").get_json()
    assert [e["name"] for e in listing["exports"]] == [f"hero-{name}-ollama-q8_0"]
    assert listing["exports"][0]["source"]["name"] == name and listing["exports"][0]["bytes"] > 0
    assert "ollama" in listing["formats"] and "q8_0" in listing["quantizations"]


def test_a_failed_export_shows_why(realm):
    from tavern.app import close_app, create_app

    config = json.loads(realm.config_path.read_text())
    config["hero"]["chat_template"] = "{% for m in messages %}{{ loop.index }}: {{ m['content'] }}\n{% endfor %}"
    realm.config_path.write_text(json.dumps(config))
    application = create_app(realm, testing=True)
    try:
        client = application.test_client()
        r = client.post(f"/api/vault/checkpoints/{latest(realm)}/export", json={"format": "ollama"}, headers=ORIGIN)
        job = finished(client, r.get_json()["id"])
        assert job["state"] == "failed" and "cannot be written as an Ollama template" in job["error"]
        assert job["path"] is None and client.get("/api/vault/exports").get_json()["exports"] == []
    finally:
        close_app(application)
    assert [p.name for p in (realm.root / "exports").iterdir()] == []


@pytest.mark.parametrize("url,body,status", [
    ("/api/vault/checkpoints/step-00999999/export", {"format": "hf"}, 404),
    ("/api/vault/checkpoints/..%2F..%2Fetc/export", {"format": "hf"}, 404),  # no route: "/" in a name
    ("/api/vault/checkpoints/..step-00000005/export", {"format": "hf"}, 400),
    ("/api/vault/checkpoints/LATEST/export", {"format": "gguf"}, 400),
    ("/api/vault/checkpoints/{latest}/export", {"format": "exe"}, 400),
    ("/api/vault/checkpoints/{latest}/export", {"format": "gguf", "quantization": "q2_k; rm -rf /"}, 400),
    ("/api/vault/checkpoints/{latest}/export", {"format": "hf", "quantization": "q8_0"}, 400),
    ("/api/vault/checkpoints/{latest}/export", ["not", "an", "object"], 400),
])
def test_bad_export_requests_are_refused_before_anything_runs(app, realm, url, body, status):
    client = app.test_client()
    r = client.post(url.format(latest=latest(realm)), json=body, headers=ORIGIN)
    assert r.status_code == status and r.get_json()["error"]
    assert client.get("/api/vault/exports").get_json()["jobs"] == []


def test_export_is_post_only_and_same_origin(app, realm):
    client = app.test_client()
    url = f"/api/vault/checkpoints/{latest(realm)}/export"
    assert client.get(url).status_code == 405
    r = client.post(url, json={"format": "hf"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and client.get("/api/vault/exports").get_json()["jobs"] == []


def test_closing_the_tavern_stops_a_running_export_and_leaves_nothing(realm):
    from tavern.app import close_app, create_app
    from tavern.pages.vault import export_jobs

    application = create_app(realm, testing=True)
    client = application.test_client()
    r = client.post(f"/api/vault/checkpoints/{latest(realm)}/export", json={"format": "gguf", "quantization": "f32"},
                    headers=ORIGIN)
    assert r.status_code == 202
    time.sleep(1.0)
    close_app(application)  # SIGTERM to the child, which removes its temporary folder
    job = export_jobs(application).jobs()[0]
    assert job["state"] in ("failed", "done")
    exports = realm.root / "exports"
    leftovers = [p.name for p in exports.iterdir()] if exports.exists() else []
    assert leftovers in ([], [f"hero-{latest(realm)}-gguf-f32"])  # stopped, or finished before the stop


def test_browser_export_button_shows_progress_and_the_written_path(realm, page):
    name = latest(realm)
    with running_tavern(realm) as live:
        page.goto(live.url + "/vault")
        page.locator(f'tr[data-checkpoint="{name}"] button[data-action="export"]').click()
        page.locator("#export-card").wait_for(state="visible")
        page.select_option("#export-format", "hf")
        assert page.locator("#export-quantization").is_disabled()
        page.select_option("#export-format", "gguf")
        page.select_option("#export-quantization", "q8_0")
        page.click("#export-button")
        page.locator('.export-job[data-state="running"]').first.wait_for(timeout=30_000)
        done = page.locator('.export-job[data-state="done"]')
        done.wait_for(timeout=240_000)
        assert f"exports/hero-{name}-gguf-q8_0/hero-{name}-q8_0.gguf" in done.inner_text()
        page.locator(f'#exports-table tr[data-export="hero-{name}-gguf-q8_0"]').wait_for()
        assert not page.console_errors

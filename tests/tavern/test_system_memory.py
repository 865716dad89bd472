"""The System page's training memory estimate (tavern/pages/system.py + core/memory.py): the realm's config
beside the free memory of the device, without torch in the Tavern process."""

from __future__ import annotations

import os
import subprocess
import sys

from core.memory import estimate_for_realm
from tests.conftest import ROOT


def test_api_system_shows_the_estimate_of_the_realm_config(client, tavern_realm):
    m = client.get("/api/system").get_json()["training_memory"]
    expected = estimate_for_realm(tavern_realm, tavern_realm.load_config(), device=m["device"])
    assert m["estimate"]["total_bytes"] == expected.total_bytes > 0
    assert m["estimate"]["adapter"] is None and m["free_bytes"] > 0 and m["fits"] is True
    assert m["lines"][0].startswith("training memory estimate (full fine-tuning")


def test_a_broken_base_model_is_reported_not_raised(make_realm):
    from tavern.app import close_app, create_app

    realm = make_realm("broken", hero={"base_model": "/nonexistent/model"}, training={"adapter": "lora"})
    app = create_app(realm, testing=True)
    try:
        m = app.test_client().get("/api/system").get_json()["training_memory"]
    finally:
        close_app(app)
    assert "does not exist" in m["error"]


def test_the_estimate_and_the_system_page_do_not_import_torch():
    code = ("import sys\nimport core.memory, core.presets, core.adapters, tavern.pages.system\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

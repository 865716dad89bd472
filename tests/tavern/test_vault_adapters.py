"""The vault page with adapter checkpoints: the API and the page show the adapter's size against what a
full checkpoint of the same model would take."""

from __future__ import annotations

import json

from tests.tavern.test_vault import HERO


def make_adapter_checkpoint(realm, step, base_parameters=1_000_000, stripped=False):
    """An adapter checkpoint folder as core.checkpoint writes one with training.adapter lora."""
    path = realm.checkpoints_dir(HERO) / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    (path / "adapter_config.json").write_text("{}")
    (path / "trainer_state.pt").write_bytes(b"\0" * 8192)
    state = {"global_step": step, "time": 1_760_000_000.0 + step, "loss": 2.0, "eval_loss": None,
             "reason": "save_steps", "hero": {"name": HERO}, "config": {},
             "adapter": {"type": "lora", "trainable_parameters": 1024,
                         "base": {"parameters": base_parameters, "weights_sha256": "0" * 64}}}
    if stripped:
        state["optimizer_state_removed"] = {"time": 1.0, "bytes_freed": 8192}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def test_api_lists_adapter_and_full_sizes(client, tavern_realm):
    make_adapter_checkpoint(tavern_realm, 10, stripped=True)
    make_adapter_checkpoint(tavern_realm, 20)
    rows = {c["name"]: c for c in client.get("/api/vault").get_json()["checkpoints"]}
    latest, old = rows["step-00000020"], rows["step-00000010"]
    assert latest["adapter"] == "lora" and latest["full_size_bytes"] == 1_000_000 * 4 * 3
    assert old["full_size_bytes"] == 1_000_000 * 4          # weights only, as a stripped full checkpoint
    assert latest["size_bytes"] < latest["full_size_bytes"] / 100


def test_the_page_shows_the_adapter_beside_its_size(live_tavern, page):
    make_adapter_checkpoint(live_tavern.realm, 30)
    page.goto(live_tavern.url + "/vault")
    cell = page.locator('tr[data-checkpoint="step-00000030"] [data-adapter="lora"]')
    cell.wait_for()
    assert "lora adapter" in cell.text_content() and "full ≈ 11.4 MB" in cell.text_content().replace("MiB", "MB")
    assert not page.console_errors, page.console_errors

"""LoRA with real daemon processes: SIGKILL mid-quest and resume gives the same global steps, examples and
losses as an uninterrupted run (on ../shared/models/stories260K and on the embedded ``small`` hero), the
adapter checkpoints are a small fraction of a full one, and ``status --json`` says so."""

from __future__ import annotations

import json

import pytest

from core.checkpoint_layout import ADAPTER_WEIGHTS_FILE, latest_checkpoint, read_checkpoint_info
from core.daemon import Daemon
from core.ledger import Ledger
from tests.conftest import STORIES260K, cli, write_text_quest
from tests.resume import assert_same_steps, kill_and_finish, trained_steps

pytestmark = pytest.mark.slow

LORA = {"adapter": "lora", "lora": {"r": 8, "alpha": 16}, "micro_batch_size": 2, "save_steps": 4,
        "eval_holdout_every": 10, "learning_rate": 3e-3}
HEROES = {
    "stories260K": {"hero": {"base_model": str(STORIES260K)}},
    "small": {"hero": {"default_size": "small"}},
}
# the adapter checkpoint (weights + optimizer + tokenizer) as a share of a full one, at most: rank 8 is 12% of
# stories260K's hidden size 64, 1.6% of small's 512
MAX_FRACTION = {"stories260K": 0.3, "small": 0.05}


@pytest.mark.parametrize("hero", list(HEROES))
def test_lora_sigkill_mid_quest_resumes_exactly(make_realm, hero):
    if hero == "stories260K" and not STORIES260K.exists():
        pytest.skip(f"{STORIES260K} is absent")
    settings = dict(training=LORA, **HEROES[hero])
    ref = make_realm("reference", **settings)
    write_text_quest(ref.inbox / "a.jsonl", 32)
    write_text_quest(ref.inbox / "b.jsonl", 16, prefix="bee")
    assert Daemon(ref, ref.load_config(), until_idle=True).run() == 0
    expected = trained_steps(Ledger(ref.ledger_path))

    realm = make_realm("killed", **settings)
    write_text_quest(realm.inbox / "a.jsonl", 32)
    write_text_quest(realm.inbox / "b.jsonl", 16, prefix="bee")
    assert expected[-1][0] > 11                                     # the kills below land mid-quest
    kill_and_finish(realm, (5, 11), timeout=600)
    got = trained_steps(Ledger(realm.ledger_path))
    assert_same_steps(got, expected, rel=1e-5, abs=1e-6)
    assert got[-1][0] == expected[-1][0]                            # the same global step at the end

    status = json.loads(cli(realm, "status", "--json").stdout)
    assert status["hero"]["adapter"] == "lora"
    assert 0 < status["hero"]["trainable_parameters"] < status["hero"]["parameters"] * MAX_FRACTION[hero]
    ckpt = latest_checkpoint(realm.checkpoints_dir("hero"))
    info = read_checkpoint_info(ckpt)["adapter"]
    adapter_bytes = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    full_bytes = info["base"]["parameters"] * 4 * 3     # fp32 weights + AdamW's two moments
    assert adapter_bytes < full_bytes * MAX_FRACTION[hero]
    print(f"\n{hero}: adapter checkpoint {adapter_bytes:,} bytes (adapter weights "
          f"{(ckpt / ADAPTER_WEIGHTS_FILE).stat().st_size:,}), a full one about {full_bytes:,} bytes "
          f"({adapter_bytes / full_bytes:.1%}); trainable {info['trainable_parameters']:,} of "
          f"{info['base']['parameters']:,} parameters")

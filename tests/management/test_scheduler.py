"""The APScheduler prune job really runs on its schedule and prunes by policy."""

from __future__ import annotations

import time

from management.scheduler import PRUNE_JOB_ID, run_prune_job, start_prune_scheduler
from tests.management.test_disk_guard import fake_checkpoint


def test_scheduled_prune_removes_what_the_policy_drops(make_realm):
    realm = make_realm(retention={"keep_last": 1, "keep_best": 0})
    for step, loss in ((1, 1.0), (2, 2.0), (3, 3.0)):
        fake_checkpoint(realm, step, loss)
    from core.ledger import Ledger

    Ledger(realm.ledger_path).close()
    scheduler = start_prune_scheduler(realm, realm.load_config(), interval_minutes=0.01)
    try:
        assert scheduler.get_job(PRUNE_JOB_ID) is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (realm.checkpoints_dir("hero") / "step-00000002").exists():
            time.sleep(0.1)
    finally:
        scheduler.shutdown(wait=True)
    # step 1 is the best (lowest loss), step 3 the latest; step 2 goes
    assert sorted(p.name for p in realm.checkpoints_dir("hero").glob("step-*")) == ["step-00000001",
                                                                                  "step-00000003"]


def test_disabled_retention_makes_the_job_a_no_op(make_realm):
    realm = make_realm(retention={"enabled": False, "keep_last": 1})
    for step in (1, 2, 3):
        fake_checkpoint(realm, step, 1.0)
    assert run_prune_job(realm, realm.load_config()) is None
    assert len(list(realm.checkpoints_dir("hero").glob("step-*"))) == 3

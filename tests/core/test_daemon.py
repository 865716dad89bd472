"""The daemon in-process on temporary realms: ingest -> validation -> queue -> training, controls."""

from __future__ import annotations

import gzip
import json
import threading
import time

import pytest

from core.daemon import AlreadyRunning, Daemon
from core.ledger import Ledger
from tests.conftest import write_text_quest


class DaemonThread:
    def __init__(self, realm, **kwargs):
        self.daemon = Daemon(realm, realm.load_config(), **kwargs)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error = None
        self.ledger = Ledger(realm.ledger_path)

    def _run(self):
        try:
            self.daemon.run()
        except BaseException as exc:  # surfaced in stop()
            self.error = exc

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.daemon.request_stop()
        self.thread.join(timeout=120)
        self.ledger.close()
        assert not self.thread.is_alive()
        if self.error and not exc[0]:
            raise self.error

    def wait_for(self, predicate, timeout=60.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error:
                raise self.error
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; quests: {self.ledger.list_quests()}")

    def answered(self, command: str) -> str:
        """Send ``command`` and wait for the daemon's answer (returned): a positive sign that the daemon went
        round its loop, where a sleep would only hope so."""
        command_id = self.ledger.send_command(command)
        self.wait_for(lambda: all(c["id"] != command_id for c in self.ledger.pending_commands()),
                      what=f"the answer to {command}")
        return self.ledger.query("SELECT result FROM commands WHERE id=?", (command_id,))[0]["result"]

    def quests(self):
        return self.ledger.list_quests()

    def states(self):
        return [q["state"] for q in self.quests()]


def test_until_idle_trains_every_quest_with_its_school(make_realm, restore_signals):
    realm = make_realm()
    write_text_quest(realm.inbox / "a.jsonl", 24)
    write_text_quest(realm.inbox / "high" / "b.jsonl", 10, prefix="bee")
    with gzip.open(realm.inbox / "pref.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: no"}) + "\n")
    (realm.inbox / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n{"text": 5}\n')
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0

    ledger = Ledger(realm.ledger_path)
    quests = {q["name"]: q for q in ledger.list_quests()}
    assert quests["a.jsonl"]["state"] == "completed" and quests["b.jsonl"]["state"] == "completed"
    assert quests["b.jsonl"]["first_global_step"] < quests["a.jsonl"]["first_global_step"]  # high first
    assert quests["a.jsonl"]["examples_trained"] == 24 and quests["b.jsonl"]["examples_trained"] == 10
    pref = quests["pref.jsonl.gz"]  # preference data: trained by the Judge (DPO)
    assert (pref["state"], pref["school"], pref["examples_trained"]) == ("completed", "dpo", 1)
    assert quests["a.jsonl"]["school"] == quests["b.jsonl"]["school"] == "sft"
    bad = quests["bad.jsonl"]
    assert bad["state"] == "failed"
    report = json.loads((realm.queue_dir("failed") / (bad["stored_name"] + ".report.json")).read_text())
    assert [b["line"] for b in report["bad_lines"]] == [2, 3]
    last = ledger.last_step()["global_step"]
    assert last == quests["a.jsonl"]["steps"] + quests["b.jsonl"]["steps"] + pref["steps"]
    assert (realm.checkpoints_dir("hero") / f"step-{last:08d}").is_dir()
    # every example line trained exactly once
    lines = [(s["quest_id"], ln) for s in ledger.steps() for ln in json.loads(s["examples_json"])]
    assert len(lines) == len(set(lines)) == 35
    assert ledger.get_value("daemon")["state"] == "stopped"


def test_second_daemon_on_the_same_realm_is_refused(make_realm):
    realm = make_realm()
    with DaemonThread(realm) as d:
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "idle", what="idle")
        with pytest.raises(AlreadyRunning):
            Daemon(realm, realm.load_config()).run()


def test_slow_writer_is_taken_only_once_complete(make_realm):
    realm = make_realm(ingest={"settle_seconds": 0.6})
    with DaemonThread(realm) as d:
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "idle", what="idle")
        path = realm.inbox / "slow.jsonl"
        with open(path, "w") as f:
            for i in range(16):          # 16 lines over ~3.2 s, pauses shorter than the settle time
                f.write(json.dumps({"text": f"slow line {i}"}) + "\n")
                f.flush()
                time.sleep(0.2)
                assert d.quests() == [], "a file still being written was taken"
        d.wait_for(lambda: d.states() == ["completed"], what="slow file trained")
        q = d.quests()[0]
        assert q["records"] == 16 and q["examples_trained"] == 16


def test_same_name_twice_both_train_and_identical_content_is_skipped(make_realm):
    realm = make_realm()
    with DaemonThread(realm) as d:
        write_text_quest(realm.inbox / "data.jsonl", 8, prefix="first")
        d.wait_for(lambda: len(d.quests()) == 1, what="first admitted")
        write_text_quest(realm.inbox / "data.jsonl", 8, prefix="second")
        d.wait_for(lambda: d.states() == ["completed", "completed"], what="both trained")
        write_text_quest(realm.inbox / "again.jsonl", 8, prefix="first")
        d.wait_for(lambda: len(d.quests()) == 3 and d.quests()[2]["state"] == "skipped", what="duplicate")
        assert "identical to quest 1" in d.quests()[2]["note"]
        names = {q["stored_name"] for q in d.quests()}
        assert len(names) == 3


def test_malformed_file_fails_and_daemon_keeps_running(make_realm):
    realm = make_realm()
    with DaemonThread(realm) as d:
        (realm.inbox / "object.json").write_text('{"data":\n [{"text": "a"}]}')
        (realm.inbox / "junk.jsonl").write_bytes(b"\x00\xff\xfe garbage\n{]\n")
        d.wait_for(lambda: d.states() == ["failed", "failed"], what="both rejected")
        reasons = " ".join(q["error"] or "" for q in d.quests())
        assert "a JSON object, not an array of records" in reasons
        write_text_quest(realm.inbox / "good.jsonl", 6)
        d.wait_for(lambda: d.states()[-1] == "completed", what="good file trained after bad ones")
        for q in d.quests()[:2]:
            assert (realm.queue_dir("failed") / (q["stored_name"] + ".report.json")).exists()


def test_pause_resume_skip_through_the_control_channel(make_realm):
    realm = make_realm(training={"micro_batch_size": 1})
    with DaemonThread(realm) as d:
        d.ledger.send_command("pause")
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "paused", what="paused")
        write_text_quest(realm.inbox / "a.jsonl", 60)
        d.wait_for(lambda: d.states() == ["queued"], what="queued while paused")
        # the daemon answers commands at the top of its loop and before each optimizer step: by its second
        # answer after the quest was queued, a daemon that ignored the pause would have taken the quest
        assert d.answered("pause") == d.answered("pause") == "paused"
        assert d.states() == ["queued"] and d.ledger.last_step() is None  # nothing trains while paused
        d.ledger.send_command("resume")
        d.wait_for(lambda: (d.ledger.last_step() or {}).get("global_step", 0) >= 2, what="training")
        write_text_quest(realm.inbox / "b.jsonl", 4, prefix="bee")
        d.wait_for(lambda: len(d.quests()) == 2 and d.quests()[1]["state"] == "queued", what="b queued")
        d.ledger.send_command("skip")
        d.wait_for(lambda: d.quests()[1]["state"] == "completed", what="b trained after skip")
        d.wait_for(lambda: d.states() == ["completed", "completed"], timeout=120, what="a finished later")
        steps = d.ledger.steps()
        a_steps = [s["global_step"] for s in steps if s["quest_id"] == 1]
        b_steps = [s["global_step"] for s in steps if s["quest_id"] == 2]
        assert min(a_steps) < min(b_steps) and max(b_steps) < max(a_steps)  # b ran inside a: skipped, resumed
        assert [json.loads(e["data"])["quest_id"] for e in d.ledger.events() if e["kind"] == "quest_skipped"] == [1]
        lines = [ln for s in steps if s["quest_id"] == 1 for ln in json.loads(s["examples_json"])]
        assert sorted(lines) == list(range(1, 61))  # nothing lost, nothing twice
        results = [c["result"] for c in d.ledger.query("SELECT * FROM commands ORDER BY id")]
        assert results[:5] == ["paused", "paused", "paused", "resumed", "skipping the current quest"]


@pytest.mark.parametrize("policy", ["drop", "reject"])
def test_length_policy_lines_are_never_trained(make_realm, policy):
    realm = make_realm(training={"max_length": 48},
                       validation={"length_policy": policy, "max_bad_line_ratio": 0.5})
    with open(realm.inbox / "mixed.jsonl", "w") as f:
        for i in range(12):
            text = f"short {i}" if i % 3 else "long " * 40   # lines 1, 4, 7, 10 are too long
            f.write(json.dumps({"text": text}) + "\n")
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    ledger = Ledger(realm.ledger_path)
    quest = ledger.list_quests()[0]
    assert quest["state"] == "completed" and quest["examples_total"] == 8
    trained = sorted(ln for s in ledger.steps() for ln in json.loads(s["examples_json"]))
    assert trained == [2, 3, 5, 6, 8, 9, 11, 12]


def test_a_stop_publishes_stopping_while_its_checkpoint_is_saved(make_realm, monkeypatch):
    realm = make_realm(training={"micro_batch_size": 1, "save_steps": 1000})
    checkpoints = realm.checkpoints_dir("hero")
    published = []  # (state, checkpoints on disk when it was published)
    publish = Ledger.publish_daemon_status

    def recording(self, status):
        published.append((status["state"], len(list(checkpoints.glob("step-*"))) if checkpoints.is_dir() else 0))
        publish(self, status)

    monkeypatch.setattr(Ledger, "publish_daemon_status", recording)
    with DaemonThread(realm) as d:
        write_text_quest(realm.inbox / "a.jsonl", 400)
        d.wait_for(lambda: (d.ledger.last_step() or {}).get("global_step", 0) >= 3, what="training")
        d.ledger.send_command("stop")
        d.thread.join(timeout=120)
        assert not d.thread.is_alive()
    states = [s for s, _ in published]
    first_stopping = states.index("stopping")
    assert "training" in states[:first_stopping] and states[-1] == "stopped"
    assert set(states[first_stopping:-1]) == {"stopping"}  # no other state once a stop began
    assert published[first_stopping][1] == 0 and published[-1][1] == 1  # the stop checkpoint came meanwhile


def test_long_prompts_are_cut_not_the_completions_and_only_examples_carrying_loss_count(make_realm):
    """GSM8K-like records whose prompts alone exceed max_length (issue 8 item 3): truncation keeps each
    completion, the report counts tokens after truncation, and every example counted as trained was in a
    step that carried loss."""
    realm = make_realm(training={"max_length": 64, "micro_batch_size": 2})
    record = {"prompt": "Natalia sold clips to 48 of her friends in April. " * 4 + "How many?\n",
              "completion": "She sold 48 + 24 = 72 clips.\n#### 72"}
    with open(realm.inbox / "gsm8k.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({**record, "prompt": f"{i}. " + record["prompt"]}) + "\n")
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    ledger = Ledger(realm.ledger_path)
    quest = ledger.list_quests()[0]
    report = json.loads((realm.queue_dir("recently_completed") / (quest["stored_name"] + ".report.json")).read_text())
    learned = len(record["completion"]) + 1  # the completion and EOS: all kept
    assert report["truncated"] == 8 and report["tokens"]["trainable"] == 8 * learned
    assert report["trainable_token_ratio"] == pytest.approx(learned / 64)
    steps = ledger.steps()
    assert quest["state"] == "completed" and quest["examples_trained"] == 8 and len(steps) == 4
    assert sum(s["example_end"] - s["example_start"] for s in steps) == 8  # each one in a step with loss
    assert not [e for e in ledger.events(limit=10_000) if e["kind"] == "empty_step"]
    ledger.close()

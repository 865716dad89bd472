"""Whisper (distillation): its loss against the documented formulas and TRL's, the teacher's resolution and
tokenizer check at validation, and a quest trained through the daemon with school ``distill``."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from core.config import QuestRule
from core.daemon import Daemon
from core.engine import Engine
from core.hero import build_byte_tokenizer, create_default_hero
from core.ledger import Ledger
from core.packing import pack_rows
from core.quest_queue import QuestQueue
from core.schools import make_school, school_problem
from core.schools.teacher import TeacherError, resolve_teacher, school_check
from core.schools.whisper import divergence, forward_kl
from core.validation import validate_file
from tests.conftest import cli, write_text_quest

TEACHER_ID = "quest*.jsonl"


def _softmax(row, t):
    z = [v / t for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def _logits(seed=0, n=6, v=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_follows_the_formula(temperature):
    student, teacher = _logits()
    got = divergence(student, teacher, "kl", temperature=temperature)
    want = [temperature ** 2 * _kl(_softmax(q, temperature), _softmax(s, temperature))
            for s, q in zip(student.tolist(), teacher.tolist(), strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert forward_kl(student, teacher).tolist() == pytest.approx(
        [_kl(_softmax(q, 1), _softmax(s, 1)) for s, q in zip(student.tolist(), teacher.tolist(), strict=True)],
        rel=1e-5)
    assert divergence(teacher, teacher, "kl", temperature=temperature).abs().max() < 1e-6


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9, 1.0])
def test_jsd_follows_the_formula(beta):
    student, teacher = _logits(1)
    got = divergence(student, teacher, "jsd", beta=beta, temperature=1.5)
    want = []
    for s, q in zip(student.tolist(), teacher.tolist(), strict=True):
        ps, pt = _softmax(s, 1.5), _softmax(q, 1.5)
        if beta == 1.0:
            want.append(1.5 ** 2 * _kl(ps, pt))
            continue
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=True)]
        want.append(1.5 ** 2 * (beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)))
    assert got.tolist() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("beta", [0.5, 0.2, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trls_generalized_jsd(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL (dev extra) is not installed")
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    trl = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta,
                                              temperature=temperature, reduction="sum")
    keep = labels.reshape(-1) != -100
    ours = divergence(student.reshape(-1, 11)[keep], teacher.reshape(-1, 11)[keep], "jsd", beta, temperature)
    assert (ours.sum() / temperature ** 2).item() == pytest.approx(trl.item(), rel=1e-5)  # ours has Hinton's T^2


def test_rule_settings_are_validated():
    with pytest.raises(ValueError, match="teacher is a setting of school distill"):
        QuestRule(school="sft", teacher="x")
    with pytest.raises(ValueError, match="loss_type kl is a setting of school distill"):
        QuestRule(school="dpo", loss_type="kl")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        QuestRule(school="distill", teacher="x", loss_type="jsd", beta=3)
    with pytest.raises(ValueError, match="alpha"):
        QuestRule(school="distill", teacher="x", alpha=1.5)
    assert make_school("distill", QuestRule(school="distill", teacher="x", loss_type="jsd")).beta == 0.5
    assert "needs a teacher" in school_problem("distill", "text", QuestRule(school="distill"))
    assert "trains SFT records" in school_problem("distill", "preference", QuestRule(school="distill"))


# --- a real engine: the nano hero, a teacher with the same tokenizer -----------------------------------------
@pytest.fixture
def teacher_realm(make_realm):
    """A realm whose quests named quest*.jsonl are distilled from ``teachers/nano7`` (a nano model of other
    weights, the hero's byte-level tokenizer)."""

    def make(name="realm", training=None, **rule):
        realm = make_realm(name, training={"packing": True, "micro_batch_size": 2, "max_length": 48,
                                           **(training or {})},
                           schools={TEACHER_ID: {"school": "distill", "teacher": "teachers/nano7", **rule}})
        create_default_hero(realm.root / "teachers" / "nano7", "nano", seed=7)
        return realm

    return make


def _items(engine, school, n=6):
    examples = [{"prompt": f"Q{i}:", "completion": f" the answer is {i * 7}"} for i in range(n)]
    return [school.encode(ex, engine.tokenizer, 48, i + 1) for i, ex in enumerate(examples)]


def test_loss_is_the_alpha_mix_of_distillation_and_scribes_cross_entropy(teacher_realm):
    realm = teacher_realm(temperature=2.0)
    config = realm.load_config()
    engine = Engine(realm, config, Ledger(realm.ledger_path))
    engine.setup()
    rule = config.schools[TEACHER_ID]
    pure, sft, mixed = (make_school("distill", rule.model_copy(update={"alpha": a})) for a in (1.0, 0.0, 0.25))
    batch = pure.collate(engine, pack_rows(_items(engine, pure), 48))
    with torch.no_grad():
        d, d_metrics = pure.loss_sum(engine, batch)
        ce, ce_metrics = sft.loss_sum(engine, batch)
        mix, _ = mixed.loss_sum(engine, batch)
        scribe = engine._loss_sum(batch)
    assert ce.item() == pytest.approx(scribe.item(), rel=1e-5)  # alpha 0 is Scribe's SFT loss
    assert mix.item() == pytest.approx(0.25 * d.item() + 0.75 * ce.item(), rel=1e-5)
    assert d_metrics[:, 1].tolist() == [batch.num_trainable] * 2  # only the loss-carrying tokens count
    assert d_metrics[1, 0].item() == pytest.approx(scribe.item(), rel=1e-5)  # distill/ce
    assert d_metrics[0, 0].item() > 0 and d_metrics[0, 0].item() == pytest.approx(ce_metrics[0, 0].item(), rel=1e-5)
    assert pure.teacher is not None and not pure.teacher.training
    assert not any(p.requires_grad for p in pure.teacher.parameters())
    # distilling from the hero's own weights: no divergence at all
    own = make_school("distill", rule.model_copy(update={"teacher": str(engine.hero_info["checkpoint"] or
                                                                       realm.hero_dir("hero") / "base"),
                                                         "alpha": 1.0}))
    with torch.no_grad():
        zero, metrics = own.loss_sum(engine, batch)
    assert abs(zero.item()) < 1e-4 and abs(metrics[0, 0].item()) < 1e-4
    engine.cleanup()


def test_the_teacher_counts_in_the_quests_memory_estimate(teacher_realm, monkeypatch):
    from core import memory

    realm = teacher_realm()
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    engine = Engine(realm, config, ledger)
    engine.setup()
    school = make_school("distill", config.schools[TEACHER_ID])
    before = school.other_model_bytes(engine)  # from the teacher folder's shape, nothing loaded
    school.load_teacher(engine)
    logits = 2 * 48 * school.teacher.config.vocab_size * 4  # micro_batch_size x max_length x vocab, fp32
    weights = sum(p.numel() * 4 for p in school.teacher.parameters())
    assert before == school.other_model_bytes(engine) == weights + logits
    assert make_school("sft").other_model_bytes(engine) == 0
    hero_only = memory.estimate_for_realm(realm, config)
    monkeypatch.setattr(memory, "available_bytes", lambda device: hero_only.total_bytes + weights // 2)
    engine._check_memory(1, make_school("sft"))  # the hero alone fits
    engine._check_memory(1, school)  # with the teacher it does not
    warnings = [e for e in ledger.latest_events(20) if e["kind"] == "memory_warning"]
    assert len(warnings) == 1 and json.loads(warnings[0]["data"])["estimate_bytes"] == hero_only.total_bytes + before
    assert "the teacher" in warnings[0]["message"]
    engine.cleanup()
    ledger.close()


def _validate(realm, name="quest_a.jsonl", **rule):
    config = realm.load_config()
    if rule:
        config = config.model_copy(update={"schools": {TEACHER_ID: QuestRule(school="distill", **rule)}})
    path = write_text_quest(realm.root / name, 6)
    return validate_file(path, config=config,
                         school_check=school_check(realm, config, build_byte_tokenizer()))


def test_validation_resolves_the_teacher_and_checks_its_tokenizer(teacher_realm):
    realm = teacher_realm()
    report = _validate(realm)
    assert report.accepted and report.school == "distill", report.reason
    assert "needs a teacher" in _validate(realm, teacher=None).reason
    assert "teachers/none" in _validate(realm, teacher="teachers/none").reason
    assert "not/cached-anywhere" in _validate(realm, teacher="not/cached-anywhere").reason  # hub id, no download
    assert "moves while the hero trains" in _validate(realm, teacher="latest").reason
    assert "no checkpoint at global step 40" in _validate(realm, teacher="step-00000040").reason
    other = realm.root / "teachers" / "other_tokens"
    shutil.copytree(realm.root / "teachers" / "nano7", other)
    tok = build_byte_tokenizer()
    tok.add_tokens(["<|tool|>"])
    tok.save_pretrained(other)
    reason = _validate(realm, teacher="teachers/other_tokens").reason
    assert "another tokenizer than the hero" in reason and "261 tokens" in reason
    # a named version and a checkpoint of the hero resolve to their folders
    version = realm.versions_dir("hero") / "v1"
    shutil.copytree(realm.root / "teachers" / "nano7", version)
    assert resolve_teacher(realm, realm.load_config(), "v1") == (version, "version v1")
    step = realm.checkpoints_dir("hero") / "step-00000012"
    shutil.copytree(realm.root / "teachers" / "nano7", step)
    assert resolve_teacher(realm, realm.load_config(), "12") == (step, "checkpoint step-00000012")
    with pytest.raises(TeacherError, match="no config.json"):
        resolve_teacher(realm, realm.load_config(), "queue")


def test_cli_validate_names_the_teacher_problem(teacher_realm):
    realm = teacher_realm()
    (realm.root / "teachers" / "nano7" / "config.json").unlink()
    path = write_text_quest(realm.root / "quest_b.jsonl", 4)
    out = cli(realm, "validate", str(path))
    assert out.returncode != 0 and "has no config.json" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_a_whisper_quest_trains_through_the_daemon(teacher_realm):
    realm = teacher_realm(alpha=0.8, training={"eval_holdout_every": 6, "eval_max_examples": 4, "eval_steps": 2})
    write_text_quest(realm.inbox / "quest_a.jsonl", 30)
    write_text_quest(realm.inbox / "quest_wrong.jsonl", 4)  # the same school, but its teacher is gone:
    config = json.loads(realm.config_path.read_text())
    config["schools"] = {"quest_wrong*": {"school": "distill", "teacher": "teachers/gone"}, **config["schools"]}
    realm.config_path.write_text(json.dumps(config))
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    ledger = Ledger(realm.ledger_path)
    quests = {q["name"]: q for q in ledger.list_quests()}
    good, bad = quests["quest_a.jsonl"], quests["quest_wrong.jsonl"]
    assert good["state"] == "completed" and good["school"] == "distill" and good["steps"] >= 3
    assert bad["state"] == "failed" and "teachers/gone" in bad["error"]
    report = json.loads(QuestQueue(realm, ledger).report_path_of(bad).read_text())
    assert not report["accepted"] and "teachers/gone" in report["reason"]
    metrics = ledger.step_metrics(good["id"])
    assert len(metrics) == good["steps"] and all(m["distill/kl"] > 0 and m["distill/ce"] > 0
                                                 for m in metrics.values())
    assert any(e["kind"] == "teacher_loaded" for e in ledger.events(limit=200))
    evals = ledger.evals(good["id"])  # held-out: the same objective on the eval records
    assert len(evals) >= 2 and all(math.isfinite(e["eval_loss"]) and e["eval_loss"] > 0 for e in evals)
    ledger.close()
    status = json.loads(cli(realm, "status", "--json").stdout)
    assert {q["name"]: q["school"] for q in status["quests"]}["quest_a.jsonl"] == "distill"

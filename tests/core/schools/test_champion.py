"""Champion (GRPO): advantages and the loss against the hand-derived formulas, prompt-only validation, and a
GRPO quest trained by the real daemon with its metrics."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch

from core.config import QuestRule
from core.daemon import Daemon
from core.engine import Engine
from core.formats import RecordError, parse_record
from core.ledger import Ledger
from core.schools import make_school
from core.schools.champion import group_advantages, grpo_token_losses
from core.schools.sampling import cut_at_stop, sampling_seed

RULES = {"sums*.jsonl": {"school": "grpo", "rewards": {"numeric_answer": 1.0, "length_penalty": {
    "weight": 0.5, "max_chars": 4}}, "num_generations": 4, "max_completion_length": 6}}
SETTINGS = dict(training={"micro_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                          "eval_holdout_every": 0}, schools=RULES)


def write_prompts(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n")


def test_group_advantages_follow_the_formula():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 0.0, 0.0]])
    adv, std = group_advantages(r)
    for row, a_row, s_row in zip(r.tolist(), adv.tolist(), std.tolist(), strict=True):
        mean = sum(row) / 4
        sd = math.sqrt(sum((x - mean) ** 2 for x in row) / 3)  # Bessel, as TRL's nanstd
        assert a_row == pytest.approx([(x - mean) / (sd + 1e-4) for x in row], rel=1e-5, abs=1e-6)
        assert s_row == pytest.approx([sd] * 4, rel=1e-6)
    assert adv[1].tolist() == [0.0] * 4  # a group with equal rewards teaches nothing
    centred, _ = group_advantages(r, scale=False)
    assert centred[2].tolist() == pytest.approx([2.0, 0.0, -1.0, -1.0])


def test_token_losses_clip_and_kl_follow_the_formula():
    logps = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5])
    ref = torch.tensor([-1.2, -1.5, -0.5, -2.0])
    losses, kl = grpo_token_losses(logps, adv, epsilon=0.2, beta=0.04, ref_logps=ref)
    k3 = [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref.tolist(), logps.tolist(), strict=True)]
    assert kl.tolist() == pytest.approx(k3, rel=1e-6)
    assert losses.tolist() == pytest.approx([-a + 0.04 * k for a, k in zip(adv.tolist(), k3, strict=True)], rel=1e-6)
    # the gradient of the clipped objective at ratio 1 is -A (d rho / d logp = 1), plus beta dKL/dlogp
    losses.sum().backward()
    dkl = [-math.exp(r - p) + 1 for r, p in zip(ref.tolist(), logps.tolist(), strict=True)]
    assert logps.grad.tolist() == pytest.approx([-a + 0.04 * d for a, d in zip(adv.tolist(), dkl, strict=True)],
                                                rel=1e-5)
    # off-policy (ratio > 1 + eps with A > 0): the clipped term wins and carries no gradient
    new = torch.tensor([0.0], requires_grad=True)
    ratio_logp = new - torch.tensor([-1.0])  # pretend pi_old = e^-1: rho = e
    rho = torch.exp(ratio_logp)
    loss = -torch.min(rho * 1.0, torch.clamp(rho, 0.8, 1.2) * 1.0)
    assert loss.item() == pytest.approx(-1.2)


def test_a_step_on_the_live_hero_matches_the_hand_computation(make_realm):
    realm = make_realm(**SETTINGS)
    engine = Engine(realm, realm.load_config(), Ledger(realm.ledger_path))
    engine.setup()
    try:
        school = make_school("grpo", realm.load_config().schools["sums*.jsonl"])
        items = [school.encode({"prompt": f"{i}+1=", "answer": str(i + 1)}, engine.tokenizer, 64, i + 1)
                 for i in range(3)]
        batch = school.collate(engine, [[it] for it in items])
        again = school.collate(engine, [[it] for it in items])
        assert again.completions == batch.completions  # seeded by (seed, global step, line): resumable
        engine.global_step += 1
        assert school.collate(engine, [[it] for it in items]).completions != batch.completions
        engine.global_step -= 1
        # rewards -> advantages by the formula, per group of G = 4
        g = 4
        rewards = [numeric(c, it.refs["answer"]) + 0.5 * -min(1.0, max(0, len(c) - 4) / 4)
                   for k, it in enumerate(items) for c in batch.completions[k * g:(k + 1) * g]]
        adv = []
        for k in range(3):
            grp = rewards[k * g:(k + 1) * g]
            mean = sum(grp) / g
            sd = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
            adv += [(r - mean) / (sd + 1e-4) for r in grp]
        assert batch.advantages.tolist() == pytest.approx(adv, abs=1e-5)
        # completion tokens (the denominator, TRL's dapo): each sequence minus its prompt
        n_tok = [len(s) - len(items[i // g].prompt_ids) for i, s in enumerate(_sequences(batch))]
        assert school.denominator([batch]) == sum(n_tok) and min(n_tok) >= 1
        # at ratio 1 the loss is -sum_i A_i n_i (no KL with beta unset)
        loss, metrics = school.loss_sum(engine, batch)
        assert loss.item() == pytest.approx(-sum(a * n for a, n in zip(adv, n_tok, strict=True)), abs=1e-4)
        assert metrics[0].tolist() == pytest.approx([sum(rewards), 12.0], abs=1e-5)
        assert metrics[3].tolist() == pytest.approx([sum(n_tok), 12.0])
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.model.parameters())
        # the memory estimate: a frozen copy of the hero's weights only when beta sets the KL term
        assert school.other_model_bytes(engine) == 0
        with_kl = make_school("grpo", QuestRule(**{**RULES["sums*.jsonl"], "beta": 0.05}))
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        assert with_kl.beta == 0.05 and with_kl.other_model_bytes(engine) == weights
    finally:
        engine.cleanup()


def numeric(completion: str, answer: str) -> float:
    from core.rewards import numeric_answer
    return numeric_answer("", completion, answer=answer)


def _sequences(batch):
    """The batch's sequences as token lists (flat or padded collation)."""
    ids, index = batch.batch.input_ids, batch.index
    return [ids[index == i].tolist() for i in range(int(index.max()) + 1)]


def test_prompt_only_records_keep_their_columns():
    fmt, ex = parse_record({"prompt": [{"role": "user", "content": "2+2"}], "answer": "4", "level": 1}, {},
                           "prompt_only")
    assert fmt == "prompt_only" and ex == {"prompt": [{"role": "user", "content": "2+2"}], "answer": "4", "level": 1}
    with pytest.raises(RecordError, match="missing field 'prompt'"):
        parse_record({"question": "x"}, {}, "prompt_only")
    with pytest.raises(RecordError, match="end with a user message"):
        parse_record({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {},
                     "prompt_only")
    with pytest.raises(RecordError, match="missing field 'completion'"):  # never detected by itself
        parse_record({"prompt": "x"}, {})


def test_sampling_seed_and_stop_cut():
    assert sampling_seed("grpo", 42, 3, 7) == sampling_seed("grpo", 42, 3, 7) != sampling_seed("grpo", 42, 4, 7)
    assert cut_at_stop([5, 6, 2, 9], [2]) == ([5, 6, 2], True)
    assert cut_at_stop([5, 6], [2]) == ([5, 6], False)


def test_a_grpo_quest_trains_through_the_daemon(make_realm):
    realm = make_realm(**SETTINGS)
    write_prompts(realm.inbox / "sums.jsonl", 8)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    ledger = Ledger(realm.ledger_path)
    quest = ledger.list_quests()[0]
    assert (quest["state"], quest["school"], quest["format"]) == ("completed", "grpo", "prompt_only")
    steps = ledger.steps()
    assert [s["global_step"] for s in steps] == [1, 2, 3, 4]  # 8 prompts, 2 per step
    lines = [ln for s in steps for ln in json.loads(s["examples_json"])]
    assert sorted(lines) == list(range(1, 9))
    metrics = ledger.step_metrics()
    for step in (1, 4):
        m = metrics[step]
        assert {"reward", "reward_std", "rewards/numeric_answer/mean", "rewards/length_penalty/mean",
                "completions/mean_length", "completions/clipped_ratio"} <= set(m)
        assert 1 <= m["completions/mean_length"] <= 6 and -0.5 <= m["reward"] <= 1
        assert m["reward"] == pytest.approx(m["rewards/numeric_answer/mean"] + 0.5 * m["rewards/length_penalty/mean"],
                                            abs=1e-5)
    assert all(math.isfinite(s["loss"]) for s in steps)


def sandbox_workers() -> list:
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("_sandbox_worker" in part for part in child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def test_a_quests_sandboxed_reward_workers_stop_when_the_quest_ends(make_realm):
    realm = make_realm(training=SETTINGS["training"], schools={"sums*.jsonl": {
        "school": "grpo", "rewards": {"file:rewards/short.py": 1.0}, "num_generations": 2,
        "max_completion_length": 4}})
    (realm.root / "rewards").mkdir()
    (realm.root / "rewards" / "short.py").write_text(
        "def reward(prompt, completion, **refs):\n    return 1.0 if len(completion) < 8 else 0.0\n")
    write_prompts(realm.inbox / "sums.jsonl", 4)
    seen, made = [], []
    real_collate, real_school_of = type(make_school("grpo")).collate, Engine.school_of

    def collate(self, engine, rows):  # the worker is alive while the quest trains
        batch = real_collate(self, engine, rows)
        seen.append(len(sandbox_workers()))
        return batch

    def school_of(self, quest):  # hold the school: its workers must not wait for the garbage collector
        made.append(real_school_of(self, quest))
        return made[-1]

    with mock.patch.object(type(make_school("grpo")), "collate", collate), \
            mock.patch.object(Engine, "school_of", school_of):
        assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    assert seen and all(n == 1 for n in seen)
    ledger = Ledger(realm.ledger_path)
    assert ledger.list_quests()[0]["state"] == "completed" and len(ledger.steps()) == 2
    ledger.close()
    assert made and sandbox_workers() == []  # stopped when the quest ended, not left for the garbage collector


def test_under_lora_the_kl_reference_is_the_adapter_as_the_quest_started(make_realm, tmp_path):
    """beta set, a LoRA adapter already trained by an SFT quest: the reference is the hero as the GRPO quest
    starts (base plus that adapter), stays so while the adapter trains, is read back on resume, and swapping
    it in leaves the live adapter bit for bit as it was."""
    from core.adapters import adapter_disabled, adapter_state
    from core.quest_queue import QuestQueue

    realm = make_realm(training={"micro_batch_size": 2, "eval_holdout_every": 0, "adapter": "lora",
                                 "learning_rate": 1e-2, "warmup_steps": 0})
    ledger = Ledger(realm.ledger_path)
    sft = [(i + 1, {"prompt": f"{i}+1=", "completion": str(i + 1)}) for i in range(8)]
    path = realm.root / "s.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for _, ex in sft))
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    ledger.update_quest(qid, format="prompt_completion", school="sft")
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    try:
        assert engine.train_quest(qid, sft).status == "completed"
        rule = QuestRule(**{**RULES["sums*.jsonl"], "beta": 0.05})
        school = make_school("grpo", rule)
        sidecar = tmp_path / "q.reference.safetensors"
        school.begin_quest(engine, 7, sidecar, 0)
        items = [school.encode({"prompt": f"{i}+1=", "answer": str(i + 1)}, engine.tokenizer, 64, i + 1)
                 for i in range(2)]
        start = school.collate(engine, [[it] for it in items])
        at_start = school._token_logps(engine, start.batch)[0].detach().cpu()
        with torch.no_grad(), adapter_disabled(engine._raw_model):
            bare = school._token_logps(engine, start.batch)[0].detach().cpu()
        assert torch.allclose(start.ref, at_start, atol=1e-5)  # the hero as the quest starts ...
        assert (start.ref - bare).abs().max() > 1e-3           # ... not the base without its adapter
        loss, _ = school.loss_sum(engine, start)
        loss.backward()
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
        live = adapter_state(engine._raw_model)
        again = school.collate(engine, [[it] for it in items])  # the adapter moved; the reference did not
        assert all(torch.equal(v, adapter_state(engine._raw_model)[k]) for k, v in live.items())
        moved = school._token_logps(engine, again.batch)[0].detach().cpu()
        assert torch.allclose(school._reference_logps(engine, start.batch), start.ref, atol=1e-5)
        assert (moved - at_start).abs().max() > 1e-4
        resumed = make_school("grpo", rule)
        resumed.begin_quest(engine, 7, sidecar, 4)  # after a restart: read back from the sidecar
        assert torch.equal(resumed._reference_logps(engine, start.batch), school._reference_logps(engine, start.batch))
    finally:
        engine.cleanup()
        ledger.close()

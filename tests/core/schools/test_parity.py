"""Numerical parity of the Judge's losses with TRL 1.16: the same model, the same tokenized pairs and the
same reference log-probs go through our school (core/schools) and through TRL's own ``_compute_loss`` of
``DPOTrainer`` / ``KTOTrainer`` (called on a stand-in trainer holding only the attributes it reads)."""

from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from core.config import QuestRule
from core.engine import Engine
from core.ledger import Ledger
from core.schools import make_school

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL (dev extra) is not installed")
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

PAIRS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
          "rejected": f" Maybe {i * 3 + 1}, or not{'!' * (i % 3)}"} for i in range(6)]
RATED = [{"prompt": f"Say {i}:", "completion": f" {i} {'yes' * (i % 2 + 1)}", "label": i % 3 != 0} for i in range(6)]


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _padded(seqs, pad):
    L = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    comp = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        comp[i, :n] = torch.tensor([int(x != -100) for x in s.labels])
    return ids, attn, comp


@pytest.fixture
def engine(make_realm):
    realm = make_realm(training={"max_length": 64, "micro_batch_size": 8})
    ledger = Ledger(realm.ledger_path)
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    yield engine
    engine.cleanup()
    ledger.close()


def _trl_model(engine):
    model = copy.deepcopy(engine._raw_model)
    model.set_attn_implementation("sdpa")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model.train()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_losses_equal_trl(engine, loss_type):
    school = make_school("dpo" if loss_type == "sigmoid" else "ipo", QuestRule(beta=0.2))
    items = [school.encode(p, engine.tokenizer, 64, i + 1) for i, p in enumerate(PAIRS)]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        engine.model.eval()
        ref = school.reference_values(engine, items) + torch.randn(len(items), 2, generator=generator) * 3
        engine.model.train()
    school.attach_reference(items, ref)
    batch = school.collate(engine, [[it] for it in items])
    ours, _ = school.loss_sum(engine, batch)
    ours = ours / len(items)

    seqs = [it.chosen for it in items] + [it.rejected for it in items]  # TRL's batch: [chosen; rejected]
    ids, attn, comp = _padded(seqs, engine.tokenizer.pad_token_id or 0)
    model = _trl_model(engine)
    trainer = SimpleNamespace(model=model, accelerator=_Acc(), aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                              loss_weights=[1.0], beta=0.2, label_smoothing=0.0, use_weighting=False,
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
              "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    theirs = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False)
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    assert ours.item() > 0.05  # a real loss, not a degenerate zero


def test_kto_loss_equals_trl(engine):
    school = make_school("kto", QuestRule(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5))
    items = [school.encode(r, engine.tokenizer, 64, i + 1) for i, r in enumerate(RATED)]
    school.prepare_items(items, len(items))  # one step: TRL's rotation within the batch
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        engine.model.eval()
        ref = school.reference_values(engine, items) + torch.randn(len(items), 2, generator=generator) * 2
        engine.model.train()
    school.attach_reference(items, ref)
    batch = school.collate(engine, [[it] for it in items])
    school.start_step(engine, [batch])
    ours, _ = school.loss_sum(engine, batch)
    ours = ours / len(items)

    pad = engine.tokenizer.pad_token_id or 0
    ids, attn, comp = _padded([it.example for it in items], pad)
    kl_ids, kl_attn, kl_comp = _padded([it.kl for it in items], pad)
    model = _trl_model(engine)
    trainer = SimpleNamespace(model=model, accelerator=_Acc(), aux_loss_enabled=False, precompute_ref_logps=True,
                              calculate_KL=True, loss_type="kto", beta=0.3, desirable_weight=1.0,
                              undesirable_weight=1.5, _metrics=defaultdict(lambda: defaultdict(list)),
                              _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "KL_input_ids": kl_ids,
              "KL_attention_mask": kl_attn, "KL_completion_mask": kl_comp,
              "label": torch.tensor([it.label for it in items]), "ref_logps": ref[:, 0], "ref_KL_logps": ref[:, 1]}
    theirs = KTOTrainer._compute_loss(trainer, model, inputs, False)
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    assert trainer._metrics["train"]["kl"][0] == pytest.approx(school._kl.item(), abs=1e-5)
    assert ours.item() > 0.05


def test_padded_rows_give_the_packed_rows_log_probs(engine):
    """On a GPU the pairs are padded rows with the 4D mask (core.packing.collate); on the CPU one flat row
    with segmented attention: the same sequence log-probs either way."""
    from core.packing import PACKED_SDPA

    school = make_school("dpo")
    items = [school.encode(p, engine.tokenizer, 64, i + 1) for i, p in enumerate(PAIRS)]
    assert engine.attn_implementation == PACKED_SDPA
    with torch.no_grad():
        packed = school.reference_values(engine, items)
        engine._raw_model.set_attn_implementation("sdpa")
        engine._attn = "sdpa"
        padded = school.reference_values(engine, items)
    assert torch.allclose(packed, padded, atol=1e-4) and packed.abs().min() > 1

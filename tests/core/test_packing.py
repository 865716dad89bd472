"""Packing (core/packing.py): greedy rows, step boundaries, and no attention across packed examples."""

from __future__ import annotations

import pytest
import torch

from core.chat import IGNORE_INDEX, TokenizedExample
from core.packing import (
    PACKED_SDPA,
    collate,
    collate_flat,
    iter_steps,
    micro_batches,
    model_attention_mask,
    pack_rows,
    register_packed_sdpa,
)
from tests.conftest import STORIES260K


def ex(n: int, line: int = 0, start: int = 3, vocab: int = 250) -> TokenizedExample:
    ids = [(start + 7 * i) % vocab for i in range(n)]
    return TokenizedExample(ids, [IGNORE_INDEX] + ids[1:], line=line)


def lengths(step):
    return [[len(e) for e in row] for row in step]


def test_greedy_rows_in_order_never_split():
    examples = [ex(n, i) for i, n in enumerate([5, 3, 4, 8, 1, 2, 8, 7])]
    steps = list(iter_steps(examples, rows_per_step=2, max_length=8))
    assert [lengths(s) for s in steps] == [[[5, 3], [4]], [[8], [1, 2]], [[8], [7]]]
    assert [e.line for s in steps for row in s for e in row] == list(range(8))  # order kept
    assert pack_rows(examples, 8) == [row for s in steps for row in s]
    unpacked = list(iter_steps(examples, rows_per_step=3, max_length=8, packing=False))
    assert [lengths(s) for s in unpacked] == [[[5], [3], [4]], [[8], [1], [2]], [[8], [7]]]
    with pytest.raises(ValueError, match="max_length"):
        list(iter_steps([ex(9)], 2, 8))


def test_steps_from_a_step_boundary_are_the_same_as_uninterrupted():
    examples = [ex(n, i) for i, n in enumerate([3, 6, 2, 2, 7, 1, 1, 5, 4, 4, 8, 2, 3])]
    full = list(iter_steps(examples, rows_per_step=2, max_length=8))
    consumed = 0
    for k, step in enumerate(full):
        resumed = list(iter_steps(examples[consumed:], rows_per_step=2, max_length=8))
        assert [lengths(s) for s in resumed] == [lengths(s) for s in full[k:]]
        consumed += sum(len(row) for row in step)
    assert consumed == len(examples)


def test_collate_shapes_positions_labels_and_block_diagonal_mask():
    a, b, c = ex(3, 1), ex(2, 2), ex(4, 3)
    batch = collate([[a, b], [c]], pad_token_id=99, pad_to=6)
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (2, 6)
    assert batch.attention_mask.shape == (2, 1, 6, 6) and batch.attention_mask.dtype == torch.bool
    assert batch.input_ids[0].tolist() == a.input_ids + b.input_ids + [99]
    assert batch.position_ids[0].tolist()[:5] == [0, 1, 2, 0, 1]
    assert batch.labels[0].tolist() == [IGNORE_INDEX] + a.input_ids[1:] + [IGNORE_INDEX] + b.input_ids[1:] + [IGNORE_INDEX]
    assert batch.num_tokens == 9 and batch.num_trainable == 2 + 1 + 3
    assert batch.segments == ((3, 3), (6,))  # document lengths per row, padding joined to the last
    m = batch.attention_mask[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [0, 0, 0, 1, 0, 0],
                 [0, 0, 0, 1, 1, 0],
                 [0, 0, 0, 0, 0, 1]]  # the pad attends only to itself: no empty softmax row
    assert collate([[a], [c]], pad_token_id=0).input_ids.shape == (2, 4)  # pad to the longest row
    with pytest.raises(ValueError):
        collate([[c]], 0, pad_to=3)
    assert [len(mb) for mb in micro_batches([[a]] * 5, 2)] == [2, 2, 1]


def test_model_attention_mask_forms():
    mask = collate([[ex(2), ex(2)]], 0).attention_mask
    assert model_attention_mask(mask, "sdpa") is mask
    assert model_attention_mask(mask, "flash_attention_2") is None
    assert model_attention_mask(mask, PACKED_SDPA) is None  # documents come as Batch.segments
    add = model_attention_mask(mask, "eager", torch.float32)
    assert add.dtype == torch.float32 and add[0, 0, 1, 0] == 0 and add[0, 0, 2, 0] == torch.finfo(torch.float32).min


def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from core.hero import HERO_SIZES

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**HERO_SIZES["nano"])).eval()


def _stories260k():
    if not STORIES260K.exists():
        pytest.skip(f"{STORIES260K} is absent (a fresh clone has no ../shared)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()


@pytest.mark.parametrize("make_model", [_tiny_qwen3, _stories260k], ids=["qwen3-nano", "stories260K"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
@torch.no_grad()
def test_packed_logits_equal_each_document_alone(make_model, attn):
    model = make_model()
    model.set_attn_implementation(register_packed_sdpa() if attn == PACKED_SDPA else attn)
    vocab = model.config.vocab_size
    docs = [ex(11, 1, start=5, vocab=vocab), ex(17, 2, start=40, vocab=vocab), ex(23, 3, start=77, vocab=vocab),
            ex(30, 4, start=9, vocab=vocab)]
    batch = collate([docs[:3], docs[3:]], pad_token_id=0, pad_to=64)
    mask = model_attention_mask(batch.attention_mask, model.config._attn_implementation, torch.float32)
    extra = {"packed_segments": batch.segments} if attn == PACKED_SDPA else {}
    packed = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, **extra).logits
    assert batch.segments == ((11, 17, 36), (64,))  # the padding joins each row's last document
    leaky = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits  # position ids only
    placements = [(0, 0), (0, 11), (0, 28), (1, 0)]
    worst_leak = 0.0
    for doc, (row, pos) in zip(docs, placements, strict=True):
        alone = model(input_ids=torch.tensor([doc.input_ids])).logits[0]
        got = packed[row, pos:pos + len(doc)]
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
        worst_leak = max(worst_leak, (leaky[row, pos:pos + len(doc)] - alone).abs().max().item())
    assert worst_leak > 1e-3  # without the mask later documents attend to earlier ones: the mask matters


@pytest.mark.parametrize("make_model", [_tiny_qwen3, _stories260k], ids=["qwen3-nano", "stories260K"])
@torch.no_grad()
def test_flat_batch_without_padding_gives_each_document_its_own_logits_and_loss(make_model):
    model = make_model()
    model.set_attn_implementation(register_packed_sdpa())
    vocab = model.config.vocab_size
    docs = [ex(11, 1, start=5, vocab=vocab), ex(17, 2, start=40, vocab=vocab), ex(30, 4, start=9, vocab=vocab)]
    rows = [docs[:2], docs[2:]]
    flat = collate_flat(rows)
    assert flat.input_ids.shape == flat.labels.shape == flat.position_ids.shape == (1, 58)
    assert flat.attention_mask is None and flat.segments == ((11, 17, 30),)
    padded = collate(rows, pad_token_id=0, pad_to=32)
    assert (flat.num_tokens, flat.num_trainable) == (padded.num_tokens, padded.num_trainable) == (58, 55)
    assert flat.labels[0].tolist() == [x for d in docs for x in [IGNORE_INDEX] + d.labels[1:]]
    assert flat.position_ids[0].tolist() == [p for d in docs for p in range(len(d))]
    logits = model(input_ids=flat.input_ids, position_ids=flat.position_ids, packed_segments=flat.segments).logits
    pos = 0
    for doc in docs:
        alone = model(input_ids=torch.tensor([doc.input_ids])).logits[0]
        torch.testing.assert_close(logits[0, pos:pos + len(doc)], alone, rtol=0, atol=1e-5)
        pos += len(doc)

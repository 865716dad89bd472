"""Loss masks of normalized examples (core/chat.py), with the byte tokenizer and stories260K's."""

from __future__ import annotations

import pytest

from core.chat import (
    IGNORE_INDEX,
    ExampleError,
    TokenCount,
    TokenizedExample,
    anchor_of,
    assistant_spans,
    check_trainable_ratio,
    count_tokens,
    count_tokens_batch,
    measure,
    measure_batch,
    tokenize_example,
    trainable_ratio,
    trainable_segments,
    truncation_start,
)
from core.config import HeroConfig
from core.hero import build_byte_tokenizer, load_tokenizer
from tests.conftest import STORIES260K

CHAT = {"messages": [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Tell me a story"},
    {"role": "assistant", "content": "Once upon a time there was a cat."},
    {"role": "user", "content": "More"},
    {"role": "tool", "content": "{\"weather\": \"sunny\"}"},
    {"role": "assistant", "content": "The end."},
]}
PROMPT_COMPLETION = {"prompt": "Lily went to the", "completion": " park and played."}
TEXT = {"text": "Once upon a time"}


@pytest.fixture(scope="module")
def byte_tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def stories_tok():
    if not STORIES260K.exists():
        pytest.skip(f"{STORIES260K} is absent (a fresh clone has no ../shared)")
    return load_tokenizer(STORIES260K, HeroConfig())


def test_text_loss_on_every_token_but_the_first_and_eos_appended(byte_tok):
    te = tokenize_example(TEXT, byte_tok, None, line=7)
    assert te.input_ids == list(b"Once upon a time") + [byte_tok.eos_token_id]
    assert te.labels[0] == IGNORE_INDEX and te.labels[1:] == te.input_ids[1:]
    assert te.line == 7 and not te.truncated


def test_prompt_completion_loss_on_completion_and_eos_only(byte_tok):
    te = tokenize_example(PROMPT_COMPLETION, byte_tok, None)
    assert trainable_segments(te, byte_tok) == [" park and played.<|endoftext|>"]
    assert byte_tok.decode(te.input_ids) == "Lily went to the park and played.<|endoftext|>"


def test_messages_loss_on_assistant_content_and_end_of_turn_only(byte_tok):
    te = tokenize_example(CHAT, byte_tok, None)
    assert trainable_segments(te, byte_tok) == ["Once upon a time there was a cat.<|im_end|>", "The end.<|im_end|>"]
    text = byte_tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert byte_tok.decode(te.input_ids) == text  # the template's own rendering, nothing added


def test_conversational_prompt_completion_trains_the_completion_turn_only(byte_tok):
    ex = {"prompt": CHAT["messages"][:3] + [{"role": "user", "content": "More"}],
          "completion": [{"role": "assistant", "content": "The end."}]}
    te = tokenize_example(ex, byte_tok, None)
    assert trainable_segments(te, byte_tok) == ["The end.<|im_end|>"]


def test_stories260k_tokenizer_uses_the_default_template(stories_tok):
    te = tokenize_example(CHAT, stories_tok, None)
    assert trainable_segments(te, stories_tok) == ["Once upon a time there was a cat.<|im_end|>",
                                                   "The end.<|im_end|>"]
    te = tokenize_example(PROMPT_COMPLETION, stories_tok, None)
    segs = trainable_segments(te, stories_tok)
    assert len(segs) == 1 and segs[0].strip() == "park and played.</s>"
    te = tokenize_example(TEXT, stories_tok, None)
    assert te.input_ids[-1] == stories_tok.eos_token_id
    assert te.trainable_tokens == len(te.input_ids) - 1


def test_template_that_rewrites_earlier_turns_falls_back_to_content_search(byte_tok):
    # Like reasoning templates: only the *last* assistant turn gets a <think></think> block, so rendering a
    # prefix of the conversation does not give a prefix of the whole text. The first turn falls back to the
    # content plus the special token after it; the last turn keeps the prefix rule (what the model generates
    # after the generation prompt, think block included).
    tok = build_byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    text, spans = assistant_spans(tok, CHAT["messages"])
    expected = ["Once upon a time there was a cat.<|im_end|>", "<think></think>The end.<|im_end|>"]
    assert [text[a:b] for a, b in spans] == expected
    assert trainable_segments(tokenize_example(CHAT, tok, None), tok) == expected


def test_truncation_keeps_the_first_tokens(byte_tok):
    te = tokenize_example({"text": "x" * 100}, byte_tok, 10)
    assert te.truncated and len(te.input_ids) == len(te.labels) == 10
    assert tokenize_example({"text": "x" * 5}, byte_tok, 10).truncated is False


def test_count_tokens_is_untruncated(byte_tok):
    total, trainable = count_tokens(PROMPT_COMPLETION, byte_tok)
    assert total == len("Lily went to the park and played.") + 1
    assert trainable == len(" park and played.") + 1


def test_unknown_shape_and_broken_template_raise(byte_tok):
    with pytest.raises(ExampleError, match="not a normalized example"):
        tokenize_example({"chosen": "a", "rejected": "b"}, byte_tok, None)
    tok = build_byte_tokenizer()
    tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(ExampleError, match="cannot render"):
        tokenize_example(CHAT, tok, None)


def test_masked_ratio_sanity_check(byte_tok):
    examples = [tokenize_example(CHAT, byte_tok, None), tokenize_example(TEXT, byte_tok, None)]
    ratio = trainable_ratio(examples)
    assert 0 < ratio < 1
    assert ratio == pytest.approx(sum(e.trainable_tokens for e in examples) / sum(len(e) for e in examples))
    assert check_trainable_ratio(100, 50, 0.01) is None
    assert "below" in check_trainable_ratio(1000, 5, 0.01)
    assert "no token carries loss" in check_trainable_ratio(10, 0, 0.01)
    silent = TokenizedExample([1, 2, 3], [IGNORE_INDEX] * 3)
    assert trainable_ratio([silent]) == 0.0 and trainable_ratio([]) == 0.0


BATCH_EXAMPLES = [
    TEXT, PROMPT_COMPLETION, CHAT, {"text": ""}, {"text": "  \n\t caf\u00e9 \U0001f389"},
    {"text": "literal <|endoftext|> and <|im_start|> inside"}, {"prompt": "", "completion": "x"},
    {"prompt": "", "completion": ""}, {"prompt": "\u00e9t\u00e9 ", "completion": "\u20ac5 \U0001f389"},
    {"prompt": "a <|im_end|>", "completion": " b"},
    {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    {"unknown": 1},
]


@pytest.mark.parametrize("which", ["byte", "stories260K"])
def test_count_tokens_batch_equals_count_tokens(which, byte_tok, request):
    tok = byte_tok if which == "byte" else request.getfixturevalue("stories_tok")
    got = count_tokens_batch(BATCH_EXAMPLES, tok)
    for example, result in zip(BATCH_EXAMPLES, got, strict=True):
        try:
            expected = count_tokens(example, tok)
        except ExampleError as exc:
            assert isinstance(result, ExampleError) and str(result) == str(exc)
            continue
        assert result == expected, example


# -- truncation: the prompt side first, what is learned is kept (issue 8 item 3) ------------------------------
LONG_PROMPT = {"prompt": "Natalia sold clips to 48 of her friends in April. " * 6 + "How many?\n",
               "completion": "She sold 48 + 24 = 72 clips.\n#### 72"}


def test_truncation_cuts_the_prompt_first_and_keeps_the_completion(byte_tok):
    full = tokenize_example(LONG_PROMPT, byte_tok, None)
    te = tokenize_example(LONG_PROMPT, byte_tok, 64)  # the prompt alone is ~300 tokens
    assert te.truncated and len(te.input_ids) == 64
    assert trainable_segments(te, byte_tok) == trainable_segments(full, byte_tok)  # the whole completion + EOS
    assert te.input_ids == full.input_ids[-64:]  # the prompt's end stays, as context
    assert te.labels[0] == IGNORE_INDEX and te.trainable_tokens == full.trainable_tokens


def test_a_completion_longer_than_max_length_keeps_its_start_after_one_prompt_token(byte_tok):
    ex = {"prompt": "Question: why?\n", "completion": "Because " * 20}
    full = tokenize_example(ex, byte_tok, None)
    te = tokenize_example(ex, byte_tok, 32)
    first = full.labels.index(next(x for x in full.labels if x != IGNORE_INDEX))
    assert te.input_ids == full.input_ids[first - 1:first + 31]  # the last prompt token, then the answer
    assert te.trainable_tokens == 31


def test_messages_truncation_keeps_the_last_assistant_turn(byte_tok):
    ex = {"messages": [{"role": "user", "content": "Tell me a long story " * 8},
                       {"role": "assistant", "content": "Once upon a time " * 6},
                       {"role": "user", "content": "More"},
                       {"role": "assistant", "content": "The end."}]}
    te = tokenize_example(ex, byte_tok, 64)
    assert te.truncated and len(te.input_ids) == 64
    assert trainable_segments(te, byte_tok)[-1] == "The end.<|im_end|>"
    short = tokenize_example(ex, byte_tok, 24)  # the last turn and what follows it fit, its user turn does not
    assert trainable_segments(short, byte_tok) == ["The end.<|im_end|>"]


@pytest.mark.parametrize("which", ["byte", "stories260K"])
@pytest.mark.parametrize("max_length", [8, 16, 40, None])
def test_measure_batch_equals_what_tokenize_example_keeps(which, max_length, byte_tok, request):
    tok = byte_tok if which == "byte" else request.getfixturevalue("stories_tok")
    examples = [*BATCH_EXAMPLES, LONG_PROMPT, {"prompt": "Question: why?\n", "completion": "Because " * 20},
                {"messages": CHAT["messages"] * 3}]
    got = measure_batch(examples, tok, max_length)
    for example, result in zip(examples, got, strict=True):
        try:
            full = tokenize_example(example, tok, None)
        except ExampleError as exc:
            assert isinstance(result, ExampleError) and str(result) == str(exc)
            continue
        kept = tokenize_example(example, tok, max_length)
        assert result == TokenCount(len(full), full.trainable_tokens, len(kept), kept.trainable_tokens), example
        assert result == measure(example, tok, max_length)
        if full.trainable_tokens:  # something learned stays learned
            assert kept.trainable_tokens > 0
            if "messages" not in example:  # learned tokens are the end: max_length - 1 of them, or all
                assert kept.trainable_tokens == min(full.trainable_tokens, (max_length or 10**9) - 1)


def test_truncation_start_never_passes_the_anchor():
    assert truncation_start(10, 20, 5) == 0  # fits
    assert truncation_start(100, 20, 90) == 80  # keep the end
    assert truncation_start(100, 20, 30) == 29  # keep the anchor and its predecessor
    assert truncation_start(100, 20, 0) == 0  # text: keep the start
    assert anchor_of([False, False, True, True, False, True], "last_turn") == 5
    assert anchor_of([False, False, True, True, False, True], "first_trained") == 2


def test_byte_level_fast_path_tokenizes_exactly_as_the_tokenizer_does(byte_tok):
    slow = build_byte_tokenizer()
    slow._realm_byte_specials = None  # the generic path: the tokenizer with offsets
    examples = [*BATCH_EXAMPLES, LONG_PROMPT, {"prompt": "caf\u00e9 \u20ac", "completion": " \U0001f389 ok"}]
    for example in examples:
        for max_length in (None, 8, 40):
            try:
                expected = tokenize_example(example, slow, max_length, line=3)
            except ExampleError as exc:
                with pytest.raises(ExampleError, match="not a normalized"):
                    tokenize_example(example, byte_tok, max_length)
                assert "not a normalized" in str(exc)
                continue
            assert tokenize_example(example, byte_tok, max_length, line=3) == expected, (example, max_length)

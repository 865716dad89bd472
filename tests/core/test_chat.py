"""Loss masks of normalized examples (core/chat.py), with the byte tokenizer and stories260K's."""

from __future__ import annotations

import pytest

from core.chat import (
    IGNORE_INDEX,
    ExampleError,
    TokenizedExample,
    assistant_spans,
    check_trainable_ratio,
    count_tokens,
    count_tokens_batch,
    tokenize_example,
    trainable_ratio,
    trainable_segments,
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

"""Hostile sampling input to the oracle (issue 8): refused with a 400 naming the field and the reason, before
any worker runs; and a conversation far over the model's context refused before it is tokenized in full."""

from __future__ import annotations

import pytest

from tavern.oracle.openai_api import to_chat_params
from tavern.oracle.service import OracleInputError, parse_chat_params
from tests.conftest import STORIES260K, needs_shared

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
AUTH = {"Authorization": "Bearer x"}  # an API client: no Origin header, no CSRF token


@pytest.mark.parametrize("extra, field", [
    ({"temperature": 1e-300}, "temperature"),  # inf/nan in the probabilities inside the worker
    ({"temperature": 0.001}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": "1"}, "top_p"),
    ({"seed": 10**30}, "seed"),  # torch.manual_seed overflow inside the worker
    ({"seed": -(10**30)}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"max_tokens": "5"}, "max_new_tokens"),
    ({"max_tokens": True}, "max_new_tokens"),
    ({"max_tokens": 5.0}, "max_new_tokens"),
    ({"max_completion_tokens": "5"}, "max_new_tokens"),
    ({"stream": "false"}, "stream"),
    ({"stream": 0}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream_options": "yes"}, "stream_options"),
    ({"n": True}, "n"),
    ({"n": "1"}, "n"),
    ({"stop": 5}, "stop"),
])
def test_openai_api_refuses_bad_sampling_input_with_a_400(client, extra, field):
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "hero", "messages": MESSAGES, **extra})
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["type"] == "invalid_request_error" and field in error["message"], error


def test_the_reasons_are_said():
    with pytest.raises(OracleInputError, match=r"temperature: .*0 \(greedy\) or at least 0.01"):
        to_chat_params({"messages": MESSAGES, "temperature": 1e-300})
    with pytest.raises(OracleInputError, match="seed: .*less than or equal to 18446744073709551615"):
        to_chat_params({"messages": MESSAGES, "seed": 10**30})
    with pytest.raises(OracleInputError, match="stream: must be true or false"):
        to_chat_params({"messages": MESSAGES, "stream": "false"})


def test_well_typed_input_is_accepted():
    params, stream, usage = to_chat_params({"messages": MESSAGES, "temperature": 1, "top_p": 1, "max_tokens": 5,
                                            "seed": 2**64 - 1, "stream": False, "n": 1,
                                            "stream_options": {"include_usage": True}, "user": "ignored"})
    assert params.temperature == 1.0 and params.max_new_tokens == 5 and params.seed == 2**64 - 1
    assert stream is False and usage is True
    assert to_chat_params({"messages": MESSAGES, "temperature": 0, "stream": None})[0].temperature == 0
    assert to_chat_params({"messages": MESSAGES, "temperature": 0.01})[0].temperature == 0.01


def test_socket_chat_params_are_strict_too():
    ok = parse_chat_params({"messages": MESSAGES, "temperature": 0.7, "top_p": 1, "max_new_tokens": 128})
    assert ok.top_p == 1.0
    for bad in ({"max_new_tokens": "128"}, {"max_new_tokens": True}, {"temperature": 1e-300},
                {"seed": 10**30}, {"temperature": float("nan")}):
        with pytest.raises(OracleInputError, match=next(iter(bad))):
            parse_chat_params({"messages": MESSAGES, **bad})


def test_a_conversation_over_the_character_cap_is_refused_in_the_tavern_process():
    huge = [{"role": "user", "content": "x" * 100_000}] * 11
    with pytest.raises(OracleInputError, match="messages: the conversation is 1100000 characters"):
        parse_chat_params({"messages": huge})


@needs_shared(STORIES260K / "model.safetensors")
def test_a_prompt_far_over_the_context_is_refused_before_it_is_tokenized(monkeypatch):
    """stories260K reads 512 tokens; 5 MB of text cannot fit whatever the tokenizer does with it."""
    from transformers.utils import logging as hf_logging

    from core.config import HeroConfig
    from tavern.oracle.engine import Engine, GenerationJob, OracleError

    hf_logging.disable_progress_bar()  # no tqdm bar (and its monitor thread) for the load
    engine = Engine(cache_size=1, device="cpu")
    job = GenerationJob(request_id="r", model_name="hero", model_path=str(STORIES260K),
                        messages=[{"role": "user", "content": "Once upon a time. " * 50}] * 5 + [
                            {"role": "user", "content": "a cat " * 100_000}] * 8,
                        max_new_tokens=4, temperature=0, hero=HeroConfig().model_dump())
    try:
        model, tokenizer = engine.load(job)
    finally:
        hf_logging.enable_progress_bar()
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the 5 MB conversation was tokenized")

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counting)
    with pytest.raises(OracleError, match="at least .* tokens .* reads at most 512") as err:
        engine.generate(job, lambda text: None, cancelled=lambda: False)
    assert err.value.status == 400 and err.value.code == "context_length_exceeded" and calls == []

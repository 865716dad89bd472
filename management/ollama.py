"""An Ollama ``Modelfile`` whose ``TEMPLATE`` renders exactly what the hero's chat template renders.

Ollama templates are Go ``text/template`` programs over ``.Messages`` (``.Role``, ``.Content``). The hero's
template is Jinja (Hugging Face ``chat_template``). :func:`derive_template` does not translate Jinja: it
renders the hero's template on probe conversations (``tokenizer.apply_chat_template``), reads off the text
around each message (head, per-role prefix and suffix, generation prompt), writes the Go template

    HEAD{{ range .Messages }}{{ if eq .Role "system" }}P_s{{ .Content }}S_s{{ else if eq .Role "user" }}...
    {{ end }}{{ end }}GEN

and then *verifies* it: :func:`render_go_template` (the subset of Go template syntax emitted here and in
common Ollama templates) must give the same string as the Jinja template for every conversation in
:data:`PROBE_CONVERSATIONS`. A template that cannot be expressed this way (a default system prompt
added when none is given, content rewritten, turns numbered, ...) raises :class:`TemplateNotExpressible`
with the first conversation that differs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_PROBE = {"system": "Sys7qProbe", "user": "Usr7qProbe", "assistant": "Ast7qProbe"}

PROBE_CONVERSATIONS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Hello!"),),
    (("system", "You are a helpful hero."), ("user", "Who are you?")),
    (("user", "Hi"), ("assistant", "Hello, traveller.\nWhat brings you here?"), ("user", "A quest 🐉, éclair")),
    (("system", "Answer briefly."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"),
     ("assistant", "6"), ("user", "Thanks\n\nBye")),
)
"""Multi-turn conversations (role, content) on which the derived template must match the hero's."""


class TemplateNotExpressible(ValueError):
    """The hero's chat template cannot be written as an Ollama (Go) template; the message says why."""


@dataclass(frozen=True)
class OllamaTemplate:
    """``template``: Go template text for ``TEMPLATE``; ``stop``: strings for ``PARAMETER stop``."""

    template: str
    stop: tuple[str, ...]


# --- rendering the hero's (Jinja) template -----------------------------------------------------------
def _jinja(tokenizer, messages: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    msgs = [{"role": r, "content": c} for r, c in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _split(text: str, parts: Sequence[str]) -> list[str]:
    """Cut ``text`` around each of ``parts`` (in order, each exactly once): len(parts)+1 pieces."""
    pieces, rest = [], text
    for part in parts:
        if rest.count(part) != 1:
            raise TemplateNotExpressible(f"the template does not show the message {part!r} exactly once "
                                         f"(rendered: {text[:300]!r})")
        before, rest = rest.split(part, 1)
        pieces.append(before)
    return [*pieces, rest]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise TemplateNotExpressible(f"{what}: {text!r} does not start with {prefix!r}")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if suffix and not text.endswith(suffix):
        raise TemplateNotExpressible(f"{what}: {text!r} does not end with {suffix!r}")
    return text[:len(text) - len(suffix)] if suffix else text


def _go_literal(text: str) -> str:
    """Literal template text; ``{{`` cannot appear as is, so it is written as a Go string action."""
    return text.replace("{{", '{{ "{{" }}')


def derive_template(tokenizer) -> OllamaTemplate:
    """The Ollama template and stop strings equivalent to ``tokenizer``'s chat template (see the module
    docstring). Raises :class:`TemplateNotExpressible`."""
    try:
        return _derive(tokenizer)
    except TemplateNotExpressible as exc:
        raise TemplateNotExpressible(f"the hero's chat template cannot be written as an Ollama template: {exc}. "
                                     "Export --format gguf (the GGUF carries the Jinja template for llama.cpp) or "
                                     "--format hf instead") from None


def _derive(tokenizer) -> OllamaTemplate:
    u1, u2, a1, s1 = _PROBE["user"] + "1", _PROBE["user"] + "2", _PROBE["assistant"] + "1", _PROBE["system"] + "1"
    try:
        three = _jinja(tokenizer, [("user", u1), ("assistant", a1), ("user", u2)], False)
        two = _jinja(tokenizer, [("user", u1), ("assistant", a1)], False)
        one = _jinja(tokenizer, [("user", u1)], False)
        one_gen = _jinja(tokenizer, [("user", u1)], True)
    except Exception as exc:  # a template that raises on plain user/assistant turns
        raise TemplateNotExpressible(f"the chat template fails on a plain conversation: {exc}") from exc
    x0, x1, x2, s_user = _split(three, [u1, a1, u2])
    _, _, s_assistant = _split(two, [u1, a1])
    p_assistant = _strip_prefix(x1, s_user, "between a user and an assistant message")
    p_user = _strip_prefix(x2, s_assistant, "between an assistant and a user message")
    head = _strip_suffix(x0, p_user, "before the first user message")
    generation = _strip_prefix(one_gen, one, "the generation prompt")
    parts = {"user": (p_user, s_user), "assistant": (p_assistant, s_assistant)}
    try:
        with_system = _jinja(tokenizer, [("system", s1), ("user", u1)], False)
    except Exception:  # the template refuses system messages: Ollama's are then left out
        with_system = None
    if with_system is not None:
        y0, y1, _ = _split(with_system, [s1, u1])
        parts["system"] = (_strip_prefix(y0, head, "before the system message"),
                           _strip_suffix(y1, p_user, "after the system message"))
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_literal(pre)}{{{{ .Content }}}}'
        f"{_go_literal(post)}" for i, (role, (pre, post)) in enumerate((r, parts[r]) for r in ROLES if r in parts))
    template = f"{_go_literal(head)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go_literal(generation)}"
    _verify(tokenizer, template, with_system="system" in parts)
    stops = [s_assistant.strip(), _common_prefix([p_user, p_assistant]).strip() or p_user.strip()]
    stop = tuple(dict.fromkeys(s for s in stops if s))
    return OllamaTemplate(template=template, stop=stop)


def _common_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _verify(tokenizer, template: str, with_system: bool) -> None:
    for conversation in PROBE_CONVERSATIONS:
        if not with_system and any(role == "system" for role, _ in conversation):
            continue
        expected = _jinja(tokenizer, conversation, True)
        got = render_go_template(template, [{"role": r, "content": c} for r, c in conversation])
        if got != expected:
            raise TemplateNotExpressible(
                "for the conversation "
                f"{json.dumps([dict(role=r, content=c) for r, c in conversation], ensure_ascii=False)} it renders "
                f"{expected!r}, the derived Go template {got!r}")


def modelfile_text(gguf_name: str, template: OllamaTemplate, context_length: int | None = None) -> str:
    """The ``Modelfile``: ``FROM ./<gguf_name>``, ``TEMPLATE`` (triple-quoted), one ``PARAMETER stop`` per
    stop string and ``PARAMETER num_ctx`` (the model's context length, when known).

    Raises :class:`TemplateNotExpressible` when the template or a stop string cannot be quoted.
    """
    if '"""' in template.template:
        raise TemplateNotExpressible('the chat template cannot be written as an Ollama template: it contains """, '
                                     "which a Modelfile cannot quote")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template.template}"""']
    for s in template.stop:
        if "\n" in s or '"' in s:
            raise TemplateNotExpressible(f"the stop string {s!r} cannot be written in a Modelfile")
        lines.append(f'PARAMETER stop "{s}"')
    if context_length:
        lines.append(f"PARAMETER num_ctx {int(context_length)}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """``{"from": str, "template": str, "stop": [str], "parameters": {name: [values]}}`` of a Modelfile
    written by :func:`modelfile_text` (tests and the Tavern read it back)."""
    out: dict[str, Any] = {"from": None, "template": None, "stop": [], "parameters": {}}
    m = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    if m:
        out["template"] = m.group(1)
        text = text[:m.start()] + text[m.end():]
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "FROM":
            out["from"] = value.strip()
        elif key == "PARAMETER":
            name, _, raw = value.strip().partition(" ")
            raw = raw.strip()
            val = json.loads(raw) if raw.startswith('"') else raw
            out["parameters"].setdefault(name, []).append(val)
    out["stop"] = out["parameters"].get("stop", [])
    return out


# --- a renderer for the subset of Go text/template syntax used in chat templates ----------------------
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_STRING = r'"(?:[^"\\]|\\.)*"'
_FIELD = re.compile(r"(\$)?\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def _tokenize(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)], with Go's ``{{-``/``-}}`` whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    if "{{" in tail:
        raise ValueError(f"unterminated action in template near {tail[:40]!r}")
    if tail := (tail.lstrip() if trim_next else tail):
        out.append(("text", tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
    """Nodes until an action in ``stop`` (``end``/``else...``): (nodes, next index, the stop action)."""
    nodes: list = []
    while i < len(tokens):
        kind, body = tokens[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop:
            return nodes, i, body
        if word == "range":
            inner, i, _ = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", body[5:].strip(), inner))
            i += 1
        elif word == "if":
            branches, cond = [], body[2:].strip()
            while True:
                inner, i, closing = _parse(tokens, i + 1, ("end", "else"))
                branches.append((cond, inner))
                if closing == "end":
                    break
                rest = closing[4:].strip()
                cond = rest[2:].strip() if rest.startswith("if") else None
            nodes.append(("if", branches))
            i += 1
        elif word.startswith("/*") or body.startswith("/*"):
            i += 1  # a comment
        else:
            nodes.append(("expr", body))
            i += 1
    if stop:
        raise ValueError(f"template: missing {{{{ end }}}} (expected one of {stop})")
    return nodes, i, ""


def _value(expr: str, dot: Any, root: dict[str, Any]) -> Any:
    expr = expr.strip()
    if re.fullmatch(_STRING, expr):
        return json.loads(expr)
    if expr == ".":
        return dot
    if m := _FIELD.fullmatch(expr):
        return _field(root if m.group(1) else dot, m.group(2))
    m = re.fullmatch(rf"eq\s+(\S+)\s+({_STRING}|\S+)", expr)
    if m:
        return _value(m.group(1), dot, root) == _value(m.group(2), dot, root)
    m = re.fullmatch(r"(and|or)\s+(\S+)\s+(\S+)", expr)
    if m:
        a, b = _value(m.group(2), dot, root), _value(m.group(3), dot, root)
        return (a and b) if m.group(1) == "and" else (a or b)
    m = re.fullmatch(r"not\s+(\S+)", expr)
    if m:
        return not _value(m.group(1), dot, root)
    raise ValueError(f"unsupported template expression {expr!r}")


def _field(obj: Any, path: str) -> Any:
    for name in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(name) if name in obj else obj.get(name.lower())
        else:
            obj = getattr(obj, name, None)
    return obj


def _run(nodes: list, dot: Any, root: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            value = _value(node[1], dot, root)
            out.append("" if value is None else str(value))
        elif node[0] == "range":
            for item in _value(node[1], dot, root) or []:
                _run(node[2], item, root, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _value(cond, dot, root):
                    _run(body, dot, root, out)
                    break


def render_go_template(template: str, messages: list[dict[str, str]], **data: Any) -> str:
    """Render ``template`` as Ollama does (Go ``text/template``), with ``.Messages`` = ``messages`` (each
    ``{"role", "content"}``, reachable as ``.Role``/``.Content``) and ``data`` as further fields.

    Supports text, ``{{ .Field }}``, ``{{ "string" }}``, ``range``, ``if``/``else if``/``else`` with
    ``eq``/``and``/``or``/``not``, ``$.Field``, comments and ``{{-``/``-}}`` trimming. Raises ``ValueError`` for
    anything else (so an unsupported template never passes verification by accident).
    """
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    root = {"Messages": msgs, **{k[:1].upper() + k[1:]: v for k, v in data.items()}}
    nodes, _, _ = _parse(_tokenize(template), 0, ())
    out: list[str] = []
    _run(nodes, root, root, out)
    return "".join(out)

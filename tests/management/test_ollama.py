"""The Ollama template: derived from the hero's Jinja chat template by rendering probes, verified on
multi-turn conversations, refused when it cannot be expressed; the Go-template renderer it is checked with
(and, when a Go toolchain is installed, Go's own text/template on the same templates)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from core.hero import DEFAULT_CHAT_TEMPLATE, build_byte_tokenizer
from management.ollama import (
    PROBE_CONVERSATIONS,
    TemplateNotExpressible,
    derive_template,
    modelfile_text,
    parse_modelfile,
    render_go_template,
)

LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
          "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}"
          "{% endif %}{% endfor %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}### assistant:{% endif %}")
BRACES = ("{% for m in messages %}{{ '{{' }}{{ m['role'] }}}} {{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}{{ '{{assistant}} ' }}{% endif %}")


def tokenizer_with(template: str):
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def conversations():
    return [[{"role": r, "content": c} for r, c in conv] for conv in PROBE_CONVERSATIONS]


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, LLAMA2, BRACES], ids=["chatml", "llama2", "braces"])
def test_derived_template_renders_what_the_chat_template_renders(template):
    tokenizer = tokenizer_with(template)
    derived = derive_template(tokenizer)
    extra = [{"role": "user", "content": "{{ .Content }} is not a placeholder here"},
             {"role": "assistant", "content": '"""quotes""" and {{braces}}'}, {"role": "user", "content": "ok"}]
    for conversation in [*conversations(), extra]:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert render_go_template(derived.template, conversation) == expected


def test_chatml_template_and_stops():
    derived = derive_template(tokenizer_with(DEFAULT_CHAT_TEMPLATE))
    assert derived.stop == ("<|im_end|>", "<|im_start|>")
    assert derived.template.endswith("{{ end }}{{ end }}<|im_start|>assistant\n")
    text = modelfile_text("hero.gguf", derived, 4096)
    parsed = parse_modelfile(text)
    assert parsed == {"from": "./hero.gguf", "template": derived.template, "stop": ["<|im_end|>", "<|im_start|>"],
                      "parameters": {"stop": ["<|im_end|>", "<|im_start|>"], "num_ctx": ["4096"]}}


def test_a_template_without_a_system_role_leaves_system_messages_out():
    tokenizer = tokenizer_with(NO_SYSTEM)
    derived = derive_template(tokenizer)
    assert '"system"' not in derived.template
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                    {"role": "user", "content": "Bye"}]
    assert render_go_template(derived.template, conversation) == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template,why", [
    ("{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}", "numbered turns"),
    ("{% if messages[0]['role'] != 'system' %}DEFAULT SYSTEM\n{% endif %}{% for m in messages %}"
     "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "a default system prompt"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}", "content rewritten"),
    ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}", "last turn marked"),
    ('{% for m in messages %}{{ m["content"] }}"""{% endfor %}', "triple quotes"),
])
def test_inexpressible_templates_are_refused_with_the_reason(template, why):
    tokenizer = tokenizer_with(template)
    with pytest.raises(TemplateNotExpressible, match="cannot be written as an Ollama template"):
        derived = derive_template(tokenizer)
        modelfile_text("x.gguf", derived)


SUBSET_CASES = [
    ("{{- range .Messages }}\n  <{{ .Role }}>{{ .Content }}\n{{- end }}", {}, "\n  <user>a\n  <assistant>b"),
    ("x  {{- range .Messages -}}  <{{ .Role }}>  {{- .Content -}}  {{ end -}}  y", {}, "x<user>a<assistant>by"),
    ('{{ range .Messages }}{{ if eq .Role "user" }}U{{ else if eq .Role "system" }}S{{ else }}A{{ end }}{{ end }}',
     {}, "UA"),
    ('{{ "{{" }}x}} {{/* a comment */}}{{ .System }}', {"system": "sys"}, "{{x}} sys"),
    ('{{ if and .System .Tools }}both{{ else if not .Tools }}no tools{{ end }}', {"system": "s"}, "no tools"),
    ("{{ range .Messages }}{{ $.Suffix }}{{ end }}", {"suffix": "!"}, "!!"),
]


@pytest.mark.parametrize("template,data,expected", SUBSET_CASES)
def test_go_template_subset(template, data, expected):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_go_template(template, messages, **data) == expected


@pytest.mark.parametrize("template", ["{{ range .Messages }}", "{{ .Content | printf }}", "{{ index .Messages 0 }}"])
def test_unsupported_go_syntax_raises_instead_of_guessing(template):
    with pytest.raises(ValueError):
        render_go_template(template, [{"role": "user", "content": "a"}])


GO_PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

func main() {
	var in struct {
		Template string
		Messages []map[string]string
		Data     map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	root := map[string]any{}
	for k, v := range in.Data {
		root[k] = v
	}
	msgs := []map[string]any{}
	for _, m := range in.Messages {
		msgs = append(msgs, map[string]any{"Role": m["role"], "Content": m["content"]})
	}
	root["Messages"] = msgs
	t := template.Must(template.New("t").Parse(in.Template))
	if err := t.Execute(os.Stdout, root); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Go's text/template (what Ollama renders TEMPLATE with): ``go_render(template, messages, **data)``."""
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to run text/template itself")
    folder = tmp_path_factory.mktemp("go")
    (folder / "main.go").write_text(GO_PROGRAM)
    (folder / "go.mod").write_text("module render\n\ngo 1.19\n")
    env = {"HOME": str(folder), "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"),
           "PATH": "/usr/bin:/bin:/usr/local/go/bin", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    subprocess.run(["go", "build", "-o", str(folder / "render"), "."], cwd=folder, env=env, check=True,
                   capture_output=True, timeout=600)

    def render(template, messages, **data):
        payload = json.dumps({"Template": template, "Messages": messages,
                              "Data": {k[:1].upper() + k[1:]: v for k, v in data.items()}})
        return subprocess.run([str(folder / "render")], input=payload, capture_output=True, text=True, check=True,
                              timeout=30).stdout

    return render


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, LLAMA2, BRACES], ids=["chatml", "llama2", "braces"])
def test_gos_own_text_template_renders_the_derived_template_alike(template, go_render):
    tokenizer = tokenizer_with(template)
    derived = derive_template(tokenizer)
    for conversation in conversations():
        out = go_render(derived.template, conversation)
        assert out == tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert out == render_go_template(derived.template, conversation)


@pytest.mark.parametrize("template,data,expected", SUBSET_CASES)
def test_gos_own_text_template_agrees_with_the_subset_renderer(template, data, expected, go_render):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    if "Tools" in template:
        data = {**data, "tools": ""}  # a missing map key prints "<no value>" in Go; Ollama's fields are ""
    assert go_render(template, messages, **data) == expected

"""core/templates.py: format strings as data, chat templates in a sandbox, the supervised split."""
from __future__ import annotations

import pytest

from core.errors import PlanError
from core.templates import (check_fields, mark_example, placeholders, render, render_chat,
                                to_prompt_completion)

TEMPLATE = {"prompt": "Clause: {text}\nCategory:", "response": " {label}", "system": None, "chat": False}


# ------------------------------------------------------------------------------ placeholders

def test_placeholders_in_order_without_repeats_and_literal_braces():
    assert placeholders("Q: {question} C: {context} {question} {{literal}} }}{{",
                        key="template.prompt") == ["question", "context"]
    assert placeholders("no fields", key="template.prompt") == []


@pytest.mark.parametrize("fmt, words", [
    ("{text.__class__}", "attribute or index"),
    ("{text.__class__.__mro__}", "attribute or index"),
    ("{text[0]}", "attribute or index"),
    ("{text[__globals__]}", "attribute or index"),
    ("{}", "positional"),
    ("{0}", "positional"),
    ("{text!r}", "conversion or format spec"),
    ("{text!a}", "conversion or format spec"),
    ("{text!s}", "conversion or format spec"),
    ("{text:>10}", "conversion or format spec"),
    ("{text:{label}}", "conversion or format spec"),
])
def test_placeholders_refuse_anything_but_a_bare_field(fmt, words):
    with pytest.raises(PlanError) as e:
        placeholders(fmt, key="template.prompt")
    assert e.value.key == "template.prompt" and words in e.value.message


@pytest.mark.parametrize("fmt, words", [("{text", "expected '}'"), ("text}", "Single '}'"),
                                        ("{text}}", "Single '}'")])
def test_placeholders_malformed(fmt, words):
    with pytest.raises(PlanError) as e:
        placeholders(fmt, key="template.response")
    assert e.value.key == "template.response" and words in e.value.message
    assert "{{" in e.value.hint


def test_placeholders_must_be_a_string():
    with pytest.raises(PlanError, match="must be a string"):
        placeholders(3, key="template.prompt")


# ------------------------------------------------------------------------------ check_fields

def test_check_fields_returns_used_fields():
    t = dict(TEMPLATE, system="You judge {kind}.")
    assert check_fields(t, ["text", "label", "kind", "unused"], file="d.jsonl") == ["text", "label", "kind"]


def test_check_fields_unknown_placeholder_lists_fields_and_suggests():
    t = dict(TEMPLATE, prompt="Q: {questoin}")
    with pytest.raises(PlanError) as e:
        check_fields(t, ["question", "context", "label"], file="data/train.jsonl")
    err = e.value
    assert err.key == "template.prompt"
    assert err.message == "placeholder {questoin} is not a field of data/train.jsonl."
    assert "`question`, `context`, `label`" in err.hint and "Did you mean `question`?" in err.hint


@pytest.mark.parametrize("part", ["response", "system"])
def test_check_fields_names_the_part(part):
    t = dict(TEMPLATE, **{part: "{nope}"})
    with pytest.raises(PlanError) as e:
        check_fields(t, ["text", "label"], file="f.csv")
    assert e.value.key == f"template.{part}"


def test_check_fields_requires_prompt_and_response():
    with pytest.raises(PlanError) as e:
        check_fields(dict(TEMPLATE, response=None), ["text", "label"], file="f")
    assert e.value.key == "template.response" and "not set" in e.value.message
    with pytest.raises(PlanError) as e:
        check_fields(dict(TEMPLATE, response="  "), ["text", "label"], file="f")
    assert "nothing to learn" in e.value.message


# ------------------------------------------------------------------------------ render

def test_render_formats_values_as_text_and_does_not_reinterpret_them():
    row = {"text": "a {label} b {0.__class__}", "label": 3}
    assert render(row, TEMPLATE) == ("Clause: a {label} b {0.__class__}\nCategory:", " 3", None)
    assert render(row, dict(TEMPLATE, system="S {label}"))[2] == "S 3"


def test_render_refuses_unsafe_template_even_unchecked():
    with pytest.raises(PlanError):
        render({"text": "x", "label": "y"}, dict(TEMPLATE, prompt="{text.__class__}"))
    with pytest.raises(PlanError) as e:
        render({"text": "x"}, TEMPLATE)
    assert e.value.key == "template.response" and "{label}" in e.value.message


# ------------------------------------------------------------------------------ chat templates

@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import PreTrainedTokenizerFast

    from compiler.models import resolve_model

    info = resolve_model({"name": "smollm2-135m", "path": None})
    hf = PreTrainedTokenizerFast(tokenizer_file=str(info.dir + "/tokenizer.json"),
                                 chat_template=info.chat_template)
    return info, hf


CONVERSATIONS = [
    [{"role": "user", "content": "Is this bullish? $AAPL up 5%"}],
    [{"role": "system", "content": "You classify tweets."}, {"role": "user", "content": "Hello\nthere"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Neutral"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_render_chat_matches_transformers_for_smollm2(smollm2, messages, gen):
    info, hf = smollm2
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert render_chat(info.chat_template, messages, add_generation_prompt=gen) == want


# the shape of Llama 3's template: bos, header tokens, trim/lstrip-sensitive whitespace, namespace
LLAMA_LIKE = """{{- bos_token }}
{%- set ns = namespace(sys='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.sys = message['content'] %}
    {%- endif %}
{%- endfor %}
{%- if ns.sys %}<|start|>system<|sep|>{{ ns.sys | trim }}<|eot|>{% endif %}
{% for message in messages if message['role'] != 'system' %}
    {% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
<|start|>{{ message['role'] }}<|sep|>{{ message['content'] | trim }}{% generation %}<|eot|>{% endgeneration %}
{% endfor %}
{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"""


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_render_chat_matches_transformers_for_a_llama_like_template(smollm2_dir, messages, gen):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"), chat_template=LLAMA_LIKE,
                                 bos_token="<|im_start|>", eos_token="<|im_end|>")
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    got = render_chat(LLAMA_LIKE, messages, add_generation_prompt=gen, bos_token="<|im_start|>",
                      eos_token="<|im_end|>")
    assert got == want and got.startswith("<|im_start|>")


def test_render_chat_raise_exception_is_a_plan_error():
    with pytest.raises(PlanError) as e:
        render_chat(LLAMA_LIKE, [{"role": "tool", "content": "x"}], add_generation_prompt=True)
    assert e.value.key == "template.chat" and "bad role tool" in e.value.message


@pytest.mark.parametrize("src", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% set ns = namespace(_x=1) %}{{ ns }}",
    "{{ messages.append(1) }}",                      # immutable sandbox: no mutation
])
def test_render_chat_is_sandboxed(src):
    with pytest.raises(PlanError) as e:
        render_chat(src, [{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert e.value.key == "template.chat"


def test_render_chat_syntax_error():
    with pytest.raises(PlanError) as e:
        render_chat("{% for m in messages %}", [], add_generation_prompt=False)
    assert e.value.key == "template.chat" and "does not parse" in e.value.message


# ------------------------------------------------------------------------------ prompt / completion

def test_to_prompt_completion_chat_smollm2(smollm2):
    info, hf = smollm2
    head, tail = to_prompt_completion("Stocks soar", "Bullish", None, chat=True,
                                      chat_template=info.chat_template, eos_token="<|im_end|>")
    assert head == hf.apply_chat_template([{"role": "user", "content": "Stocks soar"}], tokenize=False,
                                          add_generation_prompt=True)
    assert head.endswith("<|im_start|>assistant\n")
    assert tail == "Bullish<|im_end|>"                 # the trailing "\n" after the end token is dropped
    head, _ = to_prompt_completion("q", "a", "Be brief.", chat=True, chat_template=info.chat_template,
                                   eos_token="<|im_end|>")
    assert head.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_to_prompt_completion_plain():
    assert to_prompt_completion("Q?", " A", None, chat=False, chat_template=None, eos_token="</s>") == \
        ("Q?", " A</s>")
    assert to_prompt_completion("Q?", " A", "Sys", chat=False, chat_template="ignored", eos_token="") == \
        ("Sys\n\nQ?", " A")


def test_to_prompt_completion_chat_without_template():
    with pytest.raises(PlanError) as e:
        to_prompt_completion("q", "a", None, chat=True, chat_template=None, eos_token="</s>")
    assert e.value.key == "template.chat" and "no chat template" in e.value.message
    assert "template.chat=false" in e.value.hint


def test_to_prompt_completion_refuses_a_template_that_is_not_prefix_stable():
    # the generation prompt differs from how the template opens a finished assistant turn
    src = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}[assistant:]{% endif %}")
    with pytest.raises(PlanError) as e:
        to_prompt_completion("q", "a", None, chat=True, chat_template=src, eos_token="")
    assert e.value.key == "template.chat" and "prefix-stable" in e.value.message


def test_mark_example():
    assert mark_example("Q: x\nA:", " yes</s>") == "Q: x\nA:⟦ yes</s>⟧"


@pytest.mark.parametrize("src, needle", [
    ("{% for i in range(10**8) %}x{% endfor %}", "Range too big"),
    ("{{ 'x' * 100000000 }}", "larger than 1 MB"),
    ("{{ 10 ** 100000 }}", "exponent too large"),
    ("{% for i in range(9000) %}{{ 'abcdefghijklm' * 10 }}{% endfor %}",
     "rendered more than 1,048,576 characters"),
])
def test_a_chat_template_cannot_exhaust_the_machine(src, needle):
    with pytest.raises(PlanError) as e:
        render_chat(src, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert e.value.key == "template.chat" and needle in str(e.value)


# ------------------------------------------------------------------------------ chat frames

from core import templates as _templates  # noqa: E402

FRAME_TEXTS = [("Message: card lost\nIntent:", "lost_card", "You route."),
               ("  leading space", "x", None), ("trailing\n", "label ", "S"),
               ("a </think> inside", "b", None), ("ünïcode — 東京 🙂", "naïve", "Sys {x}"),
               ("<|im_end|> written by the data", "y", None), ("", "z", None),
               ("plain", "multi\nline\nanswer", "sys\n\nparagraphs")]

QWEN_LIKE = """{%- for message in messages %}{%- set content = message['content'] %}
{%- if message['role'] == 'assistant' and '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}
<|im_start|>{{ message['role'] }}
{{ content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
UPPER = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | upper }}{% endfor %}" \
        "{% if add_generation_prompt %}[assistant]{% endif %}"
SLICING = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'][:24] }}|{% endfor %}" \
          "{% if add_generation_prompt %}[assistant]{% endif %}"


def _slow(template, prompt, response, system, eos="<|im_end|>"):
    return _templates._rendered_pair(prompt, response, system, chat_template=template,
                                     eos_token=eos, bos_token="<|im_start|>")


def _fast(template, prompt, response, system, eos="<|im_end|>"):
    return _templates.to_prompt_completion(prompt, response, system, chat=True,
                                           chat_template=template, eos_token=eos,
                                           bos_token="<|im_start|>")


@pytest.mark.parametrize("which", ["smollm2", "llama_like", "qwen_like"])
def test_chat_frame_gives_the_full_renderings_strings(which, smollm2):
    """The frame (the template rendered once over placeholder texts) yields exactly what rendering
    each example does — texts with edge whitespace (trimmed by the llama-like template), a literal
    the template tests texts against (`'</think>' in content`) and control-token text included."""
    template = {"smollm2": smollm2[0].chat_template, "llama_like": LLAMA_LIKE,
                "qwen_like": QWEN_LIKE}[which]
    _templates._chat_frame.cache_clear()
    for prompt, response, system in FRAME_TEXTS * 6:
        if not prompt:
            continue
        try:
            want = _slow(template, prompt, response, system)
        except PlanError:
            continue
        assert _fast(template, prompt, response, system) == want
    frames = [_templates._chat_frame(template, "<|im_start|>", "<|im_end|>", s) for s in (True, False)]
    assert all(f is not None and not f.retired for f in frames)
    assert sum(f.uses for f in frames) > 0           # the frame answered, not only the fallback


def test_chat_frame_sees_what_a_template_tests_texts_against():
    assert "</think>" in _templates._inspected_literals(QWEN_LIKE)
    # roles compared against names are not texts: a message saying "user" keeps the fast path
    assert "user" not in _templates._inspected_literals(QWEN_LIKE)
    frame = _templates._chat_frame(QWEN_LIKE, "", "<|im_end|>", False)
    assert frame.split("a </think> b", "c", None) is None
    assert frame.split("the user asks", "c", None) is not None


def test_no_frame_for_a_template_that_changes_the_text():
    _templates._chat_frame.cache_clear()
    assert _templates._chat_frame(UPPER, "", "</s>", False) is None
    assert _fast(UPPER, "shout this", "ok", None, eos="</s>") == _slow(UPPER, "shout this", "ok",
                                                                       None, eos="</s>")


def test_a_frame_that_disagrees_with_the_template_is_retired():
    """A template that cuts texts (content[:24]) passes the placeholder check; the first examples,
    rendered both ways, show the difference: the frame retires and every answer is the template's."""
    _templates._chat_frame.cache_clear()
    frame = _templates._chat_frame(SLICING, "<|im_start|>", "</s>", False)
    assert frame is not None
    rows = [(f"a question long enough to be cut {i}", "ok", None) for i in range(5)]
    for prompt, response, system in rows:
        assert _fast(SLICING, prompt, response, system, eos="</s>") == \
            _slow(SLICING, prompt, response, system, eos="</s>")
    assert frame.retired

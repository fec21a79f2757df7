"""Hostile input takes bounded work: a model's chat template, a recipe file, a numeric key or a
command-line override that would take unbounded time or memory (or crash with exit 1) is refused
with a PlanError (exit 2) naming the key or the file and line — in well under a second, measured at
the function that refuses (the `tune plan` tests only check the exit code and the message)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from compiler import safety, schema
from core import chat_sandbox
from core.errors import PlanError
from core.templates import render_chat

FAST_S = 1.0       # the refusal itself, on a busy two-core machine
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def refused(fn, *args, **kwargs) -> PlanError:
    """The PlanError fn raises, and that it raised it within FAST_S."""
    t0 = time.perf_counter()
    with pytest.raises(PlanError) as e:
        fn(*args, **kwargs)
    elapsed = time.perf_counter() - t0
    assert elapsed < FAST_S, f"refused after {elapsed:.2f} s"
    return e.value


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


# ------------------------------------------------------------------------------ chat templates

HOSTILE_CHAT = {
    # (template, words the refusal says)
    "huge range": ("{% for i in range(10**9) %}xxxxxxxxxx{% endfor %}", "Range too big"),
    "nested loops writing": ("{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxxxx"
                             "{% endfor %}{% endfor %}", "more than 50,000 loop iterations"),
    "nested loops, silent": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
                             "{% endfor %}", "more than 50,000 loop iterations"),
    "loops over a built list": ("{% set l = [0] * 10000 %}{% for a in l %}{% for b in l %}"
                                "{% endfor %}{% endfor %}", "loop iterations"),
    "exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                          "{% endmacro %}{{ f(60) }}", "calls"),
    "recursive loop": ("{% for i in range(1000) recursive %}{{ loop(range(1000)) if loop.depth < 6 }}"
                       "{% endfor %}", "loop iterations"),
    "doubling with ~": ("{% set ns = namespace(s='xx') %}{% for i in range(60) %}"
                        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", "larger than 1 MB"),
    "doubling with +": ("{% set ns = namespace(s=[1]) %}{% for i in range(60) %}"
                        "{% set ns.s = ns.s + ns.s %}{% endfor %}", "larger than 1 MB"),
    "billion laughs": ("{% set a = ['lol','lol','lol','lol','lol','lol','lol','lol','lol'] %}"
                       + "".join(f"{{% set {n} = [{p},{p},{p},{p},{p},{p},{p},{p},{p}] %}}"
                                 for p, n in zip("abcdefgh", "bcdefghi")) + "{{ i }}",
                       "larger than 1 MB"),
    "shared items written": ("{{ [[0] * 1000] * 1000 }}", "larger than 1 MB"),
    "string times": ("{{ 'x' * 10**9 }}", "larger than 1 MB"),
    "center": ("{{ 'x'|center(10**9) }}", "the filter `center`"),
    "indent": ("{{ 'a\\nb'|indent(10**9) }}", "the filter `indent`"),
    "wordwrap": ("{{ ('x' * 100)|wordwrap(1, wrapstring='y' * 100000) }}", "the filter `wordwrap`"),
    "replace": ("{{ ('a' * 500000)|replace('a', 'aaaaa') }}", "the filter `replace`"),
    "join": ("{{ (['x' * 100] * 1000)|join('y' * 1000) }}", "the filter `join`"),
    "format filter": ("{{ '%999999999d'|format(1) }}", "the filter `format`"),
    "batch": ("{{ [1]|batch(10**9, 0)|list }}", "the filter `batch`"),
    "printf": ("{{ '%999999999d' % 1 }}", "`%`"),
    "str.format": ("{{ '{:>999999999}'.format(1) }}", "`format`"),
    "str.ljust": ("{{ 'x'.ljust(10**9) }}", "`ljust`"),
    "str.join": ("{{ ('y' * 20000).join(['x'] * 100) }}", "`join`"),
    "str.replace": ("{{ ('a' * 500000).replace('a', 'aaaaa') }}", "`replace`"),
    "str.expandtabs": ("{{ ('\\t' * 1000).expandtabs(100000) }}", "`expandtabs`"),
    "power": ("{{ 10 ** 100000 }}", "exponent too large"),
    "squaring": ("{% set ns = namespace(x=3) %}{% for i in range(100) %}"
                 "{% set ns.x = ns.x * ns.x %}{% endfor %}", "integer of more than"),
    "round": ("{{ 1.5|round(10**9, 'floor') }}", "rounded to"),
    "sum of lists": ("{{ [[1]] * 1000|sum(start=[]) }}", "`sum`"),
    "tojson indent": ("{{ messages|tojson(indent=10**9) }}", "indented tojson"),
    "captured output": ("{% set x %}{% for i in range(40000) %}{{ 'y' * 1000 }}{% endfor %}"
                        "{% endset %}{{ x|length }}", "built more than 16,777,216 characters"),
    "output": ("{% for i in range(9000) %}{{ 'abcdefghijklm' * 10 }}{% endfor %}",
               "rendered more than 1,048,576 characters"),
    "deep parentheses": ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "cannot be compiled"),
    "deep blocks": ("{% for a in [1] %}" * 30 + "x" + "{% endfor %}" * 30, "cannot be compiled"),
    "long source": ("x" * (chat_sandbox.MAX_SOURCE + 1), "characters long"),
}


@pytest.mark.parametrize("name", list(HOSTILE_CHAT))
def test_a_hostile_chat_template_is_refused_fast(name):
    src, needle = HOSTILE_CHAT[name]
    e = refused(render_chat, src, MESSAGES, add_generation_prompt=True)
    assert e.key == "template.chat"
    assert needle in e.message, e.message
    assert "template.chat=false" in e.hint


def test_a_slow_chat_template_stops_at_the_time_limit(monkeypatch):
    # comparing two long strings is work no count sees: the clock stops it
    monkeypatch.setattr(chat_sandbox, "MAX_SECONDS", 0.2)
    src = ("{% set s = 'x' * 1000000 %}{% set t = 'x' * 1000000 %}"
           "{% for i in range(40000) %}{% if s == t %}{% endif %}{% endfor %}")
    e = refused(render_chat, src, MESSAGES, add_generation_prompt=True)
    assert e.key == "template.chat" and "ran for more than 0.2 s" in e.message


# Everything the bounds hook into (loops, loop.*, recursive loops, macros, call/set/filter blocks,
# ~ and +, literals, filters and methods that can grow a value, namespace) used within its limits.
RICH_TEMPLATE = """\
{%- macro show(m) -%}[{{ m['role']|upper }}] {{ m['content']|trim }}{%- endmacro -%}
{%- set ns = namespace(n=0, names=[]) -%}
{%- for m in messages if m['role'] != 'tool' -%}
  {%- set ns.n = ns.n + 1 -%}{%- set ns.names = ns.names + [m['role']] -%}
  {{ loop.index }}/{{ loop.length }}{{ ' last' if loop.last }} {{ show(m) }}
{% endfor -%}
{%- set block %}{% for k, v in {'b': 2, 'a': 1}|dictsort %}{{ k ~ '=' ~ v }};{% endfor %}{% endset -%}
{{ block }} {{ ns.n }} {{ ns.names|join(', ') }} {{ (1, 2) + (3,) }} {{ [1, 2] * 2 }}
{% filter upper %}{{ 'ab'|center(6) }}|{{ 'x\\ny'|indent(2, true) }}|{{ '%05d'|format(42) }}{% endfilter %}
{{ '{:>4}|{}'.format(7, 'z') }} {{ 'a-b-c'.replace('-', '+') }} {{ '-'.join(['p', 'q']) }}
{{ [1, 2, 3, 4, 5]|batch(2, 0)|list }} {{ range(7)|slice(3)|list }} {{ [1, 2, 3]|sum }}
{%- for item in [[1, [2, 3]], [4]] recursive %}<{{ loop.depth }}:{% if item is iterable %}{{ loop(item) }}{% else %}{{ item }}{% endif %}>{% endfor %}
{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|list|tojson }}
{{ 2 ** 10 }} {{ 'x' * 3 }} {{ 7 % 3 }} {{ 'ab' ~ 3 }} {{ 1.25|round(1) }} {{ 'a b c'|wordwrap(3) }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""


def test_chat_templates_within_the_limits_render_as_jinja_renders_them():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    want = plain.from_string(RICH_TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    assert render_chat(RICH_TEMPLATE, MESSAGES, add_generation_prompt=True) == want
    assert "2/2 last [USER] hi" in want and "<1:<2:1><2:<3:2><3:3>>><1:<2:4>>" in want


def test_size_counts_shared_items_each_time_and_stops_early():
    row = ["ab"] * 1000
    table = [row] * 1000                          # one list held 1,000 times: 2 MB written out
    assert chat_sandbox.size(row) == 2 + 8 * 1000 + 2 * 1000
    assert chat_sandbox.size(table) > chat_sandbox.MAX_TEXT
    t0 = time.perf_counter()
    deep = ["x"]
    for _ in range(20):
        deep = [deep] * 10                        # 10^20 items once written out
    assert chat_sandbox.size(deep) > chat_sandbox.MAX_TEXT
    assert time.perf_counter() - t0 < FAST_S


def test_plan_refuses_a_model_whose_chat_template_never_finishes(tune_cli, tmp_path, tiny_chat_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = HOSTILE_CHAT["nested loops, silent"][0]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{11 + i % 80} w{12 + i % 80}", "label": "w20"})
                            + "\n" for i in range(40)))
    run = tmp_path / "run"
    rc, out, err = tune_cli("plan", f"model.path={model}", f"data.path={data}",
                            f"hydra.run.dir={run}")
    text = flat(out + err)
    assert rc == 2, text
    assert "template.chat" in text and "more than 50,000 loop iterations" in text
    assert "Traceback" not in text
    assert not (run / "plan.json").exists()


# ------------------------------------------------------------------------------ recipe files

def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def deep_block_mapping(depth: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "1\n"


HOSTILE_RECIPES = {
    # name -> (text, words of the message, the line it names)
    "alias bomb": (alias_bomb(), "once the alias *a", 4),
    "alias bomb of mappings": (
        "a: &a {x: 1, y: 2, z: 3, w: 4, v: 5, u: 6, t: 7, s: 8, r: 9}\n"
        + "".join(f"{n}: &{n} {{" + ", ".join(f"k{j}: *{p}" for j in range(9)) + "}\n"
                  for p, n in zip("abcdefgh", "bcdefghi")), "once the alias *c", 4),
    "alias into itself": ("a: &a [1, *a]\n", "refers to a value that contains it", 1),
    "deep lists": ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than 64 levels", 1),
    "deep flow mappings": ("x: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
                           "nested more than 64 levels", 1),
    "deep block mappings": (deep_block_mapping(100), "nested more than 64 levels", 65),
    "many values": ("adapter:\n  targets: [" + ", ".join(["q_proj"] * 6000) + "]\n",
                    "more than 5,000 values", 2),
    "a huge text": ("template:\n  system: \"" + "x" * 70000 + "\"\n", "70,000 characters", 2),
    "a huge integer": ("adapter:\n  alpha: 1" + "0" * 5000 + "\n", "5,001 characters long", 2),
    "a tagged huge integer": ("adapter:\n  alpha: !!int 1" + "0" * 5000 + "\n",
                              "5,001 characters long", 2),
    "an impossible date": ("schedule:\n  seed: 0\ndata:\n  path: 2024-13-45\n",
                           "YAML cannot build the value", 4),
}


@pytest.mark.parametrize("name", list(HOSTILE_RECIPES))
def test_a_hostile_recipe_file_is_refused_fast_with_its_line(tmp_path, name):
    text, needle, line = HOSTILE_RECIPES[name]
    path = tmp_path / "evil.yaml"
    e = refused(safety.load_recipe_yaml, path, text)
    assert e.key == "recipe" and e.file == str(path) and e.line == line, e
    assert needle in e.message, e.message


def test_a_recipe_too_long_is_refused_before_it_is_parsed(tmp_path):
    text = "# " + "x" * safety.MAX_RECIPE_CHARS + "\nschedule:\n  seed: 1\n"
    e = refused(safety.load_recipe_yaml, tmp_path / "long.yaml", text)
    assert e.key == "recipe" and "characters long" in e.message


def test_a_recipe_with_a_few_aliases_still_loads(tmp_path):
    text = ("template:\n  prompt: &p \"Clause: {text}\"\n  system: *p\n"
            "adapter:\n  targets: &t [q_proj, v_proj]\n  train_modules: []\n")
    data = safety.load_recipe_yaml(tmp_path / "ok.yaml", text)
    assert data["template"]["system"] == "Clause: {text}"
    assert data["adapter"]["targets"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("name", ["alias bomb", "deep lists", "a huge integer", "an impossible date"])
def test_plan_refuses_a_hostile_recipe(tune_cli, tmp_path, name):
    text, needle, line = HOSTILE_RECIPES[name]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "evil.yaml").write_text(text)
    run = tmp_path / "run"
    rc, out, err = tune_cli("plan", "+recipe=evil", f"hydra.run.dir={run}")
    text_out = flat(out + err)
    assert rc == 2, text_out
    assert f"evil.yaml:{line}:" in text_out and needle in text_out
    assert not run.exists()


def test_plan_refuses_a_huge_recipe_file_without_reading_it(tune_cli, tmp_path):
    (tmp_path / "recipes").mkdir()
    with open(tmp_path / "recipes" / "evil.yaml", "w") as f:
        f.write("# x\n")
        f.truncate(64 << 20)                    # 64 MiB, sparse
    rc, out, err = tune_cli("plan", "+recipe=evil", f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 2 and "evil.yaml" in flat(out + err) and "bytes long" in flat(out + err)


# ------------------------------------------------------------------------------ numbers

NUMERIC = [k for k in schema.KEYS if k.kind in ("int", "number", "axis")]


@pytest.mark.parametrize("key", NUMERIC, ids=lambda k: k.path)
def test_every_numeric_key_has_a_finite_range(key):
    assert key.low is not None and key.high is not None, key.path
    assert abs(key.low) < 1e300 and abs(key.high) < 1e300


@pytest.mark.parametrize("value", [10**400, -10**400, "1" + "0" * 5000, 1e308, -1e308,
                                   99999999999999999999999])
@pytest.mark.parametrize("key", NUMERIC, ids=lambda k: k.path)
def test_every_numeric_key_refuses_a_number_too_large(key, value):
    e = refused(schema.check_override, key.path, value)
    assert e.key == key.path
    assert len(str(e)) < 600          # the number is shown by its magnitude, not in full


def test_a_number_too_large_is_shown_by_its_magnitude():
    e = refused(schema.check_override, "data.max_length", 99999999999999999999999)
    assert "must be at most 131072, got 1.000e+23" in e.message
    e = refused(schema.check_override, "schedule.warmup", 10**400)    # was an OverflowError
    assert "got 1.000e+400" in e.message


def test_validate_refuses_numbers_too_large_from_a_composed_config():
    cfg = schema.defaults()
    cfg["adapter"]["alpha"] = 10**400                  # was an OverflowError in alpha / rank
    e = refused(schema.validate, cfg)
    assert e.key == "adapter.alpha" and "at most" in e.message


def test_plan_refuses_numbers_too_large(tune_cli, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "big.yaml").write_text("# big\nadapter:\n  alpha: 1" + "0" * 60 + "\n")
    rc, out, err = tune_cli("plan", "+recipe=big", f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 2 and "big.yaml:3:" in flat(out + err) and "adapter.alpha" in flat(out + err)
    for override, key in (("schedule.warmup=1" + "0" * 400, "schedule.warmup"),
                          ("adapter.alpha=1" + "0" * 5000, "adapter.alpha"),
                          ("data.max_length=99999999999999999999999", "data.max_length")):
        rc, out, err = tune_cli("plan", override, f"hydra.run.dir={tmp_path / 'run'}")
        assert rc == 2 and key in flat(out + err), flat(out + err)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ texts, lists, overrides

def test_long_texts_and_lists_are_refused_fast():
    e = refused(schema.check_override, "template.system", "x" * 1_000_000)
    assert e.key == "template.system" and "1,000,000 characters" in e.message
    e = refused(schema.check_override, "adapter.targets", ["q_proj"] * 100_000)
    assert e.key == "adapter.targets" and "100,000 items" in e.message
    e = refused(schema.check_override, "adapter.targets", ",".join(f"m{i}" for i in range(10_000)))
    assert e.key == "adapter.targets" and "10,000 items" in e.message
    e = refused(schema.check_override, "data.max_length", "x" * 50_000)
    assert len(str(e)) < 600          # the value is shown cut short


@pytest.mark.parametrize("override, needle", [
    ("adapter.targets=[" + ",".join(["q_proj"] * 100_000) + "]", "characters long"),
    ("adapter.targets=[" + ",".join(["q_proj"] * 1_000) + "]", "more than 256 values"),
    ("template.system=" + "x" * 1_000_000, "characters long"),
    ("+data={" + ",".join(f"k{i}:1" for i in range(5_000)) + "}", "more than 256 values"),
    ("+x=" + "[" * 1_000 + "]" * 1_000, "more than 64 levels"),
    ("adapter.alpha=1" + "0" * 5_000, "more than 100 digits"),
])
def test_an_override_is_bounded_before_hydra_reads_it(override, needle):
    e = refused(safety.check_override_size, override)
    assert needle in e.message and e.key == override.split("=")[0].lstrip("+")


def test_quoted_texts_are_not_counted_as_lists_or_numbers():
    safety.check_override_size("template.prompt='" + "a, b, [c], 1" * 200 + "0" * 200 + "'")
    safety.check_override_size("adapter.targets=[q_proj,k_proj,v_proj,o_proj]")
    safety.check_override_size("schedule.lr=range(0,10)")


@pytest.mark.parametrize("override, needle", [
    ("adapter.targets=[" + ",".join(["q_proj"] * 100_000) + "]", "characters long"),
    ("template.system=" + "x" * 100_000, "100,000 characters long"),
    ("+x=" + "[" * 1_000 + "]" * 1_000, "more than 64 levels"),        # was a RecursionError
    ("adapter.alpha=1" + "0" * 5_000, "more than 100 digits"),          # was a ValueError
    ("schedule.seed=range(0,1000000000000)", "more than 1,000 values"),
])
def test_plan_refuses_a_huge_override(tune_cli, tmp_path, override, needle):
    rc, out, err = tune_cli("plan", "-m", override, f"hydra.sweep.dir={tmp_path / 'sweep'}") \
        if "range(" in override else tune_cli("plan", override, f"hydra.run.dir={tmp_path / 'run'}")
    text = flat(out + err)
    assert rc == 2, text
    assert needle in text and "Traceback" not in text
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()

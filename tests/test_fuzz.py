"""Fuzzing the compiler's entry points: whatever a user, a shared recipe or a model directory gives,
tune answers with a result or a PlanError (exit 0 or 2) — never another exception (exit 1, a
traceback), never a hang past a time limit, never a write outside the run directory.

Entry points: plan.json, a model's config.json, recipe YAML, template format strings, model chat
templates, and the whole `tune plan` command line (overrides, data rows, templates) over a tiny model.
The examples are drawn with a fixed seed (derandomize), so CI runs the same ones every time, in a
bounded time; `TUNE_FUZZ_EXAMPLES=N` draws N per entry point (with TUNE_FUZZ_SEED=S for other
examples than CI's), for a longer search:

    TUNE_FUZZ_EXAMPLES=2000 TUNE_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py -q
"""
import copy
import json
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from core.errors import PlanError  # noqa: E402

EXAMPLES = int(os.environ.get("TUNE_FUZZ_EXAMPLES", "0") or 0)
SEED = os.environ.get("TUNE_FUZZ_SEED")
LIMIT_S = 5.0           # one call of a compiler function
CLI_LIMIT_S = 60.0      # one `tune plan`


def fuzz(ci_examples: int):
    """Hypothesis settings: `ci_examples` (or TUNE_FUZZ_EXAMPLES) drawn with a fixed seed."""
    n = EXAMPLES or ci_examples

    def wrap(fn):
        fn = settings(max_examples=n, deadline=None, derandomize=SEED is None, database=None,
                      suppress_health_check=list(HealthCheck), print_blob=True,
                      phases=(Phase.explicit, Phase.generate, Phase.shrink))(fn)   # no tracing
        return seed(int(SEED))(fn) if SEED is not None else fn
    return wrap


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so tune's own handlers cannot swallow it."""


@contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def answers(fn, *args, limit: float = LIMIT_S, **kw):
    """fn's result, or the PlanError it raised; any other exception, or a hang, fails the test."""
    with time_limit(limit):
        try:
            return fn(*args, **kw)
        except PlanError as e:
            assert str(e).strip() and e.key, "a PlanError names its key and says what is wrong"
            return e


# ------------------------------------------------------------------------------ values

HUGE = (10**400, -10**400, 2**63, 2**64 + 1, 10**12, -1, 0, 1)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from(HUGE), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", " ", "1_6", "0x10", "1e400", "nan", "${oc.env:HOME}",
                                           "../../etc/passwd", "/etc/passwd", "{text}", "{"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


def _paths(doc, prefix=()):
    """Every path into a JSON document (dict keys and list indexes)."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base: dict, edits: int = 3):
    """`base` with a few values replaced by arbitrary JSON values, or deleted."""
    doc = copy.deepcopy(base)
    paths = [p for p in _paths(doc) if p]
    for _ in range(draw(st.integers(1, edits))):
        path = draw(st.sampled_from(paths))
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            if draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass
    return doc


def dumps(doc) -> str:
    try:
        return json.dumps(doc)
    except (ValueError, OverflowError):
        return json.dumps(doc, default=str)


# ------------------------------------------------------------------------------ plan.json

@pytest.fixture(scope="module")
def plan_doc(tiny_chat_dir, tmp_path_factory):
    from conftest import tiny_plan

    return tiny_plan(tiny_chat_dir, tmp_path_factory.mktemp("fuzz-plan")).to_dict()


def test_fuzz_plan_json(plan_doc):
    from core.plan import Plan

    @fuzz(150)
    @given(st.data())
    def check(data):
        doc = data.draw(mutated(plan_doc, edits=4))
        text = dumps(doc)
        if data.draw(st.booleans()):         # or the file itself damaged
            cut = data.draw(st.integers(0, len(text)))
            text = text[:cut] + data.draw(st.one_of(st.text(max_size=8), st.just("[" * 100_000))) \
                + text[cut:][:len(text)]
        plan = answers(Plan.from_json, text, file="plan.json")
        if isinstance(plan, Plan):
            answers(plan.is_consistent)

    check()


# ------------------------------------------------------------------------------ config.json

def test_fuzz_model_config_json():
    from conftest import TINY_LLAMA

    from core.architecture import ModelConfig, architecture

    base = {**TINY_LLAMA, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
            "head_dim": 8}

    @fuzz(200)
    @given(mutated(base, edits=3))
    def check(hf):
        cfg = answers(ModelConfig.from_hf, hf)
        if isinstance(cfg, ModelConfig):
            answers(architecture, hf)
            answers(cfg.check)
            answers(cfg.param_count)

    check()


# ------------------------------------------------------------------------------ recipe YAML

_YAML_PIECES = st.sampled_from([
    "a: &a [x, x, x, x, x, x, x, x]\n", "b: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n",
    "c: [*b, *b, *b, *b, *b, *b, *b, *b]\n", "schedule:\n  lr: 1e400\n", "adapter:\n  rank: '1_6'\n",
    "_target_: os.system\n", "hydra:\n  callbacks: {}\n", "defaults:\n  - override /hydra/launcher: x\n",
    "# @package _global_.hydra\n", "data:\n  path: ${oc.env:HOME}\n", "key: !!python/object:os.system x\n",
    "[" * 200 + "]" * 200 + "\n", "x: " + "[" * 3000 + "\n", ": : :\n", "\t- x\n", "x: *undefined\n",
    "template:\n  prompt: '{text!r}'\n", "model:\n  path: /etc\n", "eval:\n  limit: -1\n"])


@st.composite
def recipe_texts(draw):
    if draw(st.booleans()):
        return "".join(draw(st.lists(_YAML_PIECES, min_size=1, max_size=4)))
    import yaml

    doc = draw(st.dictionaries(st.sampled_from(["data", "template", "adapter", "schedule",
                                                "model", "eval", "hydra", "defaults", "x"]),
                               json_values, max_size=4))
    return yaml.safe_dump(doc, default_flow_style=False) if doc else draw(st.text(max_size=40))


def test_fuzz_recipe_yaml(tmp_path):
    from compiler import safety

    path = tmp_path / "fuzzed.yaml"

    @fuzz(150)
    @given(recipe_texts())
    def check(text):
        doc = answers(safety.load_recipe_yaml, path, text)
        if isinstance(doc, dict):
            answers(safety.check_config, doc)

    check()


# ------------------------------------------------------------------------------ templates

_TEMPLATE_PIECES = st.sampled_from(["{text}", "{label}", "{", "}", "{{", "}}", "{0}", "{}", "{a.b}",
                                    "{a[0]}", "{text!r}", "{text:>10}", "{text:{label}}", "Q: ",
                                    "\n", "{missing}", "{" + "x" * 300 + "}"])
_CHAT_PIECES = st.sampled_from([
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "{% for i in range(10**9) %}xxxxxxxxxx{% endfor %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}", "{{ messages.__class__.__mro__ }}", "{{ ''.__class__ }}",
    "{% set x = [] %}{% for i in range(10) %}{{ x.append(i) }}{% endfor %}",
    "{{ raise_exception('no') }}", "{% if add_generation_prompt %}assistant:{% endif %}",
    "{{ bos_token }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ 1/0 }}",
    "{{ messages | tojson }}", "{% for", "{{ (10**400) | string }}", "{{ [1] * 10**9 }}",
    "{{ range(2**62) | list }}", "{{ 'ab' | replace('a', 'a' * 1000000) }}",
    "{{ messages[0]['content'] * 100000000 }}"])


def test_fuzz_format_templates():
    from core.templates import placeholders, render

    row = {"text": "some text", "label": "Alpha", "x" * 300: "y"}

    @fuzz(150)
    @given(st.lists(_TEMPLATE_PIECES, min_size=1, max_size=6).map("".join),
           st.lists(_TEMPLATE_PIECES, max_size=3).map("".join))
    def check(prompt, response):
        names = answers(placeholders, prompt, key="template.prompt")
        if isinstance(names, list) and set(names) <= set(row) and \
                isinstance(answers(placeholders, response, key="template.response"), list):
            answers(render, row, {"prompt": prompt, "response": response or "{label}"})

    check()


def test_fuzz_chat_templates():
    from core.templates import render_chat

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]

    @fuzz(80)
    @given(st.lists(_CHAT_PIECES, min_size=1, max_size=3).map("".join), st.booleans())
    def check(source, generation):
        answers(render_chat, source, messages, add_generation_prompt=generation, bos_token="<s>",
                eos_token="</s>")

    check()


# ------------------------------------------------------------------------------ the command line

_RECIPE = """
model:
  path: {model}
data:
  path: data/train.jsonl
  val_fraction: 0.1
template:
  prompt: "Q: {{text}}\\nA:"
  response: "{{label}}"
schedule:
  batch_size: 4
  max_steps: 2
"""


def _rows(draw) -> str:
    good = [{"text": f"w{11 + i % 80} w{12 + i % 70}", "label": "w20" if i % 2 else "w21"}
            for i in range(40)]
    lines = [json.dumps(r) for r in good]
    for _ in range(draw(st.integers(0, 3))):
        bad = draw(st.one_of(
            st.dictionaries(st.sampled_from(["text", "label", "other"]), json_values, max_size=3)
            .map(dumps),
            st.text(max_size=30), st.sampled_from(['{"text": "a", "label": NaN}', '{"text": 1e999}',
                                                    "[1, 2]", '{"text": "a"', "\ufeff", "null"])))
        lines.insert(draw(st.integers(0, len(lines))), bad)
    return "\n".join(lines) + "\n"


def _override(draw) -> str:
    from compiler import schema

    key = draw(st.sampled_from(sorted(k for k in schema.BY_PATH
                                      if k.split(".")[0] in ("data", "template", "adapter",
                                                             "schedule", "runtime", "eval"))))
    value = draw(st.one_of(
        st.sampled_from(["0", "-1", "1", "1e400", "10000000000000000000000", "'1_6'", "null", "nan",
                         "[]", "[q_proj,x]", "true", "'{text}'", "'{text!r}'", "auto", "''",
                         "'../../x'", "/etc/passwd", "'${oc.env:HOME}'", "{a:1}"]),
        st.integers(-10**6, 10**6).map(str)))
    return f"{key}={value}"


def _tree(root: Path, skip: tuple[Path, ...]) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if not any(p == s or s in p.parents for s in skip)}


def test_fuzz_tune_plan(tiny_chat_dir, monkeypatch, capsys):
    """`tune plan` over a tiny model with fuzzed data rows and overrides: exit 0 or 2, never 1, never
    a traceback; nothing written outside the run directory (and $TUNE_HOME's caches)."""
    from tune.cli import main

    monkeypatch.delenv("TUNE_RECIPE_PATH", raising=False)
    monkeypatch.delenv("TUNE_DEBUG", raising=False)
    home = os.getcwd()

    @fuzz(12)
    @given(st.data())
    def check(data):
        rows = _rows(data.draw)
        overrides = [_override(data.draw) for _ in range(data.draw(st.integers(0, 3)))]
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            (root / "recipes").mkdir()
            (root / "recipes" / "fz.yaml").write_text(_RECIPE.format(model=tiny_chat_dir))
            (root / "data").mkdir()
            (root / "data" / "train.jsonl").write_text(rows, encoding="utf-8")
            before = _tree(root, ())
            capsys.readouterr()
            os.chdir(root)
            try:
                with time_limit(CLI_LIMIT_S):
                    rc = main(["plan", "+recipe=fz", "hydra.run.dir=run", *overrides])
            finally:
                os.chdir(home)
            out, err = capsys.readouterr()
            assert rc in (0, 2), f"exit {rc} for {overrides}:\n{err}"
            assert "Traceback" not in err
            assert _tree(root, (root / "run",)) == before, "written outside the run directory"
            if rc == 2:
                assert not (root / "run").exists() or not any((root / "run").iterdir())

    check()


def test_the_fuzzed_command_line_starts_from_a_plan_that_compiles(tiny_chat_dir, tune_cli, tmp_path):
    """The fuzzing above starts from a valid recipe: without fuzzed rows or overrides it compiles
    (so the exit codes it sees come from what was fuzzed)."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "fz.yaml").write_text(_RECIPE.format(model=tiny_chat_dir))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(_rows(lambda strategy: 0), encoding="utf-8")
    rc, out, err = tune_cli("plan", "+recipe=fz", "hydra.run.dir=run")
    assert rc == 0, err

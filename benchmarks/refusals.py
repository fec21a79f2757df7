"""How long tune takes to refuse hostile input: each case is handed to the function that refuses it
(the recipe reader, the chat-template sandbox, the config.json reader, the schema, the plan reader),
timed over a few repeats. Each must end in a PlanError (exit 2 on the command line) well under a
second; tests/test_bounds.py and tests/test_artifacts.py assert < 1 s, this prints the figures.

    python benchmarks/refusals.py              # a markdown table on stdout
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import safety, schema  # noqa: E402
from core.architecture import ModelConfig  # noqa: E402
from core.errors import PlanError  # noqa: E402
from core.plan import Plan  # noqa: E402
from core.templates import render_chat  # noqa: E402

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
MESSAGES = [{"role": "user", "content": "hi"}]


def _bomb(levels: int = 9) -> str:
    names = "abcdefghijklmnop"[:levels + 1]
    text = f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]\n"
    for prev, name in zip(names, names[1:]):
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
    return text


def _chat(source: str):
    return lambda: render_chat(source, MESSAGES, add_generation_prompt=True)


CASES = [
    ("recipe: YAML alias bomb (9 levels, 9 per level)",
     lambda: safety.load_recipe_yaml(Path("bomb.yaml"), _bomb())),
    ("recipe: 3,000 levels deep",
     lambda: safety.load_recipe_yaml(Path("deep.yaml"), "x: " + "[" * 3000 + "]" * 3000 + "\n")),
    ("recipe: `rank: 1_6`", lambda: safety.load_recipe_yaml(Path("r.yaml"), "adapter:\n  rank: 1_6\n")),
    ("chat template: a 10^9-iteration loop",
     _chat("{% for i in range(10**9) %}xxxxxxxxxx{% endfor %}")),
    ("chat template: nested 10^5 x 10^5 loops",
     _chat("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")),
    ("chat template: `'x' * 10**10`", _chat("{{ 'x' * 10**10 }}")),
    ("chat template: recursion without end", _chat("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")),
    ("config.json: num_hidden_layers = 10^8",
     lambda: ModelConfig.from_hf({**LLAMA, "num_hidden_layers": 10**8})),
    ("config.json: vocab_size = 10^400", lambda: ModelConfig.from_hf({**LLAMA, "vocab_size": 10**400})),
    ("schedule.warmup = 10^400", lambda: schema.coerce(schema.BY_PATH["schedule.warmup"], 10**400)),
    ("adapter.targets: a list of 100,000 names",
     lambda: schema.coerce(schema.BY_PATH["adapter.targets"], ["q_proj"] * 100_000)),
    ("plan.json: 100,000 nested brackets", lambda: Plan.from_json("[" * 100_000)),
]


def main() -> int:
    rows = []
    for name, fn in CASES:
        times, outcome = [], "accepted"
        for _ in range(5):
            t0 = time.perf_counter()
            try:
                fn()
            except PlanError:
                outcome = "refused (exit 2)"
            except RecursionError:
                outcome = "RecursionError"
            times.append(time.perf_counter() - t0)
        rows.append((name, outcome, statistics.median(times) * 1000, max(times) * 1000))
    print("| input | outcome | median ms | max ms |\n| --- | --- | ---: | ---: |")
    for name, outcome, med, worst in rows:
        print(f"| {name} | {outcome} | {med:.1f} | {worst:.1f} |")
    bad = [r for r in rows if r[1] != "refused (exit 2)" or r[3] >= 1000]
    print(json.dumps({"all_refused_under_1s": not bad}), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

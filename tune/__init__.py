"""tune's command line: `tune [train|plan|eval|generate|run|recipes] ...` (tune/cli.py).

The flow of a command: tune/compose.py (Hydra: conf/ + recipe + overrides → a config dict)
→ compiler/ (config → a validated, typed Plan) → runtime/ (Plan → adapter, metrics, eval, report).
"""

"""The `tune` command: dispatch to a command, turn every failure into an exit code.

    tune [OVERRIDES]                 compile, then train (same as `tune train ...`)
    tune plan|train|eval|generate|lr-find [OVERRIDES]
    tune export run=DIR format=peft|merged|gguf [out=PATH]
    tune serve run=DIR | runs=[DIR,...] [host=127.0.0.1] [port=8000]   an OpenAI-compatible API
    tune run PATH/plan.json [DIR]    re-run a compiled plan exactly (no Hydra)
    tune recipes [list | show NAME | cp NAME DEST]

The flow: tune/compose.py composes the config with Hydra (conf/ + recipe + overrides), after a
pre-check of the overrides (unknown recipes, invalid recipe files, unknown keys and wrong types stop
there with exit code 2, before Hydra creates a run directory); tune/commands.py compiles it into a
Plan (compiler/) and hands the Plan to the runtime (runtime/).
Exit codes: 0 ok, 2 a PlanError (one readable paragraph, no traceback), 3 training diverged (a
non-finite loss or gradient norm: stopped at that step, last good checkpoint kept), 1 anything
else (a short message; the traceback with TUNE_DEBUG=1), 130 interrupted.
"""
from __future__ import annotations

import os
import sys
import traceback

from core.errors import Diverged, PlanError, did_you_mean
from tune import commands, compose
from tune.console import print_error, print_failure

COMMANDS = compose.COMMANDS
OTHER_COMMANDS = ("run", "recipes")
USAGE = """usage: tune [train|plan|eval|generate|lr-find|export|serve] [OVERRIDES...] [--help] [--cfg job] [-m]
       tune run PATH/plan.json [RUN_DIR]
       tune recipes [list | show NAME | cp NAME DEST]"""


# ------------------------------------------------------------------------------ entry point

def main(argv: list[str] | None = None) -> int:
    """Run `tune` with argv (default sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except PlanError as e:
        print_error(e)
        return 2
    except KeyboardInterrupt:
        print_failure("interrupted.")
        return 130
    except Diverged as e:
        print_failure(f"error: {e}")
        return e.exit_code
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print_failure(str(code))
        return 1
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into an exit code
        config_error = compose.config_error(e)
        if config_error is not None:
            print_error(config_error)
            return 2
        if os.environ.get("TUNE_DEBUG") == "1":
            traceback.print_exc()
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print_failure(f"error: {type(e).__name__}: {msg}  (TUNE_DEBUG=1 shows the traceback)")
        return 1


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "recipes":
        return commands.recipes(argv[1:])
    if argv and argv[0] == "run":
        return commands.run_plan_file(argv[1:])
    command = "train"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    elif argv and argv[0] == "help":
        argv = ["--help"]
    elif argv and not argv[0].startswith(("-", "+", "~")) and "=" not in argv[0]:
        word = argv[0]
        raise PlanError("command", f"unknown command `{word}`."
                        f"{did_you_mean(word, COMMANDS + OTHER_COMMANDS)} Commands: "
                        f"{', '.join(COMMANDS + OTHER_COMMANDS)}; overrides look like key=value.",
                        hint="`tune --help` shows the commands, config groups and keys.")
    return compose.run_hydra(command, argv, commands.run_job)


if __name__ == "__main__":
    sys.exit(main())

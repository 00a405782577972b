"""`graft --help`, every command's --help, a parse error and `graft plan` answer without
importing torch, which takes seconds to import on a small machine: the command modules
import what is heavy inside their handlers, and the run config's dataclasses (each
training command's options) and the planner's arithmetic are importable without it.

The cases run in a fresh interpreter (this one has torch already), one after another,
each checked before the next, so that a failure names the first case that imported it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CASES = {
    "graft --help": ["--help"],
    "graft sft --help": ["sft", "--help"],
    "graft data inspect --help": ["data", "inspect", "--help"],
    "unknown option": ["sft", "--train.max-step", "3"],
    "missing required option": ["eval", "--adapter", "runs/lora/final", "--data", "x.jsonl"],
    "graft plan of a preset": ["plan", "--model", "tiny", "--data", "2M", "--json"],
}

CHILD = """
import contextlib, io, json, sys
from graftlm.cli import build_parser, main

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    results[name] = {"status": status, "torch": "torch" in sys.modules, "stdout": out.getvalue(),
                     "stderr": err.getvalue()}
    if results[name]["torch"]:
        break
# and every command's help, as `graft COMMAND --help` formats it
parser = build_parser()
subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
for command, sub in subcommands.items():
    sub.format_help()
results["every command's help"] = {"status": 0, "torch": "torch" in sys.modules, "commands": len(subcommands)}
print(json.dumps(results))
"""


def test_help_parse_errors_and_plan_import_no_torch():
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    imported = [name for name, result in results.items() if result["torch"]]
    assert not imported, f"torch was imported by: {imported[0]}"
    assert len(results) == len(CASES) + 1

    assert results["graft --help"]["status"] == 0 and "pretrain" in results["graft --help"]["stdout"]
    assert "--train.max-steps" in results["graft sft --help"]["stdout"]
    assert results["graft data inspect --help"]["status"] == 0
    assert results["unknown option"]["status"] == 2
    assert "did you mean --train.max-steps?" in results["unknown option"]["stderr"]
    assert results["missing required option"]["status"] == 2
    assert "--model" in results["missing required option"]["stderr"]
    plan = results["graft plan of a preset"]
    assert plan["status"] == 0, plan["stderr"]
    assert json.loads(plan["stdout"])["regimes"]
    assert results["every command's help"]["commands"] >= 15


def test_objective_specs_use_the_configs_the_commands_are_built_from():
    """`graft <command> --help` reads each objective's section and help from
    `objectives.configs`, not from its module's SPEC: the two must be the same."""
    from graftlm.objectives import available, config_class, get_spec
    from graftlm.objectives.configs import HELP

    for name in available():
        spec = get_spec(name)
        assert spec.config_cls is config_class(name) and spec.help == HELP[name], name


def test_loading_a_model_and_generating_do_not_import_dynamo(tiny_hf_dir):
    """Building a model on the meta device ran torch's init there, whose reference
    implementations import torch._dynamo: 2-5 s of every `graft generate`, `chat`, `eval`
    and `serve` that never compiles. `models.transformer.skeleton` skips that init."""
    child = ("import sys\nfrom graftlm.models.hf import load_model\nfrom graftlm.engine import Engine, SamplingParams\n"
             f"model = load_model({str(tiny_hf_dir)!r})\n"
             "Engine(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0.8, seed=0))\n"
             "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"

"""README.md stays true where a test can tell: CI runs the README's test command, and the
flags table lists every flag of ``chatledger serve``."""

from __future__ import annotations

import re
from pathlib import Path

from chatledger.server.cli import parser

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = next(b.strip() for b in bash_blocks(readme) if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_serve_command_uses_the_local_extra():
    readme = (ROOT / "README.md").read_text()
    serve = bash_blocks(readme)[0].strip()
    assert "'.[local]'" in serve and serve.endswith("chatledger serve --llm local")


def test_flags_table_lists_every_serve_flag():
    readme = (ROOT / "README.md").read_text()
    serve = parser()._subparsers._group_actions[0].choices["serve"]
    flags = {o for a in serve._actions for o in a.option_strings if o.startswith("--")}
    flags.discard("--help")
    missing = {f for f in flags if f"`{f}`" not in readme}
    assert not missing

"""``Settings`` declared once: the ``serve`` parser and the ``Settings`` of a command
line are both built from the fields, and ``--help`` shows the real defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatledger.server.cli import parser, settings_from
from chatledger.server.settings import FLAG, Settings
from chatledger.storage import Durability


def serve_help(capsys) -> str:
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_no_flags_are_the_defaults():
    assert settings_from(parser().parse_args(["serve"])) == Settings()


def test_flags_become_settings():
    args = parser().parse_args(
        [
            "serve",
            "--port",
            "9000",
            "--data-dir",
            "/srv/chat",
            "--durability",
            "flush",
            "--keepalive",
            "2.5",
            "--llm",
            "openai",
            "--model",
            "m",
            "--max-streams",
            "0",
            "--trusted-proxy",
            "10.0.0.1",
            "--trusted-proxy",
            "::1",
        ]
    )
    settings = settings_from(args)
    assert settings.port == 9000 and settings.data_dir == Path("/srv/chat")
    assert settings.durability is Durability.FLUSH
    assert settings.keepalive == 2.5 and settings.llm == "openai" and settings.model == "m"
    assert settings.max_streams == 0
    assert settings.trusted_proxies == ("10.0.0.1", "::1")


@pytest.mark.parametrize(
    "argv",
    [
        ["--keepalive", "-1"],
        ["--demo-tokens-per-s", "-0.5"],
        ["--durability", "sometimes"],
        ["--llm", "oracle"],
        ["--port", "http"],
    ],
)
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["serve", *argv])
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_help_shows_the_real_defaults(capsys):
    text = serve_help(capsys)
    for shown in (
        "(default: 127.0.0.1)",
        "(default: 8080)",
        "(default: ./chatledger-data)",
        "(default: fsync)",
        "(default: 15)",
        "(default: demo)",
        "(default: https://api.openai.com/v1)",
        "(default: 1024)",
        "(default: 30)",
        "(default: 60)",
        "(default: 262144)",
        "(default: 2000)",
        "(default: 20)",
    ):
        assert shown in text


def test_every_flag_is_a_setting():
    flagged = [f.name for f in dataclasses.fields(Settings) if FLAG in f.metadata]
    serve = parser()._subparsers._group_actions[0].choices["serve"]
    dests = [a.dest for a in serve._actions if a.dest != "help"]
    assert dests == flagged

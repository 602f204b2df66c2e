"""The luna command and what every command shares: subcommands, --version, -q/-v, help text."""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import luna
from luna import cli
from luna.datadir import DataDir


def _parsers():
    """Every command's parser, built as the command builds it."""
    from luna.bench.__main__ import build_parser as bench
    from luna.diagnose.__main__ import build_parser as diagnose
    from luna.evaluate.__main__ import _parser as evaluate
    from luna.prepcache import build_parser as prepcache
    from luna.series import build_parser as series
    from luna.synth.cli import build_parser as synth
    from luna.training.app import build_parser as train

    return {"train": train(), "diagnose": diagnose(), "evaluate": evaluate(), "series": series(),
            "prepcache": prepcache(), "synth": synth(), "bench": bench()}


def test_every_subcommand_has_a_parser():
    assert set(_parsers()) == set(cli.COMMANDS)
    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help_and_no_markup(name):
    parser = _parsers()[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
    text = parser.format_help()
    assert "`" not in text, f"{name} --help shows reStructuredText backticks"
    assert "-q, --quiet" in text and "-v, --verbose" in text and "--version" in text
    # every option with a real default shows it
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, 0, argparse.SUPPRESS) \
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            shown = cli.HelpFormatter(name)._get_help_string(action)
            assert "default" in shown, f"{name} {action.option_strings}: default {action.default!r} not shown"


def test_plain_text_removes_markup_only():
    assert cli.plain_text("``python -m luna.diagnose`` runs `diagnose` on x`s") == "python -m luna.diagnose runs diagnose on x`s"


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert luna.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        _parsers()["evaluate"].parse_args(["--version"])
    assert exc.value.code == 0
    assert f"luna {luna.__version__}" in capsys.readouterr().out


def test_luna_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    assert cli.main(["diagnoze"]) == 2
    assert "did you mean 'luna diagnose'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_subcommand_help_names_luna(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: luna evaluate")
    # and the python -m form outside it
    assert _parsers()["evaluate"].prog == "python -m luna.evaluate"


def test_quiet_and_verbose_set_the_log_level():
    parser = _parsers()["series"]
    try:
        parser.parse_args(["-q"])
        assert logging.getLogger().level == logging.WARNING
        assert not cli.progress_enabled(parser.parse_args(["-q"]))
        parser.parse_args(["-qq"])
        assert logging.getLogger().level == logging.ERROR
        parser.parse_args(["-v"])
        assert logging.getLogger().level == logging.DEBUG
        parser.parse_args([])
        assert logging.getLogger().level == logging.INFO
    finally:
        cli.configure_logging(0)


def test_user_error_is_one_line(tmp_path, capsys):
    assert cli.main(["series", "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing" in err


def test_series_lists_uids_sizes_and_split(tiny_dataset, tmp_path, capsys):
    data = DataDir.open(tiny_dataset)
    assert cli.main(["series", "--data-dir", str(tiny_dataset), "--val-stride", "2"]) == 0
    out = capsys.readouterr().out
    for uid in data.series_uids:
        assert uid in out
    from luna.io import load_ct

    ct = load_ct(data.scan_path(data.series_uids[0]))
    assert "x".join(map(str, ct.hu.shape)) in out
    assert "synthetic phantoms" in out
    listing = tmp_path / "val.txt"
    assert cli.main(["series", "--data-dir", str(tiny_dataset), "--val-stride", "2", "--validation",
                     "--uids-only", "--out", str(listing)]) == 0
    from luna.annotations import split_series

    expected = split_series(data.series_uids, 2)[1]
    assert capsys.readouterr().out.split() == expected
    assert listing.read_text().split() == expected


def test_python_m_luna_runs_the_luna_command():
    src = Path(luna.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "luna", "--version"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(src), "PATH": ""}, timeout=60)
    assert done.returncode == 0 and luna.__version__ in done.stdout


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["luna"] == "luna.cli:main"
    assert project["name"] != "luna"  # taken on PyPI by an unrelated project

"""What every luna command shares, and the ``luna`` command that runs them all.

``luna <command> [options]`` runs one subcommand (`COMMANDS`): ``luna train`` is
``python -m luna.training``, ``luna diagnose`` is ``python -m luna.diagnose``, and
so on; both forms take the same options. ``luna --version`` names the version.

Every command's parser is an `ArgumentParser` from here, which gives it:

- ``-q/--quiet`` (warnings and errors only, no progress bars; ``-qq``: errors only)
  and ``-v/--verbose`` (debug messages with their logger's name), applied to
  logging as soon as the command line is parsed (`configure_logging`);
- ``--version``;
- `HelpFormatter`: ``(default: X)`` after every option that has a default, and the
  reStructuredText markup of docstrings (````x````, ```x```) shown as plain text.

`run_cli` runs a command's ``main(argv)``: a `LunaError` (a problem the user can
fix) becomes one line on stderr and exit status 2; any other exception is a bug and
keeps its traceback. Progress bars (tqdm, on stderr) show on a terminal unless
``-q`` is given (`progress_enabled`); log lines go around them.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import platform
import re
import sys
from typing import Callable, Sequence

from luna.errors import LunaError

__all__ = [
    "COMMANDS",
    "DICOM_OPTIONS",
    "ArgumentParser",
    "HelpFormatter",
    "add_data_arguments",
    "add_dicom_arguments",
    "configure_logging",
    "dicom_options",
    "main",
    "prog",
    "progress_enabled",
    "run_cli",
    "version_text",
]

DICOM_OPTIONS = {
    "allow_gaps": "read a DICOM series with missing slices, stacked at the median spacing "
                  "(positions past a gap are then off)",
    "allow_nonuniform": "read a DICOM series whose slice spacing varies, stacked at the median spacing",
    "allow_tilt": "read a DICOM series acquired with gantry tilt, with a sheared geometry that keeps "
                  "every slice's position",
}
"""The DICOM reader's options (`luna.io.dicom.read_dicom_series`), as ``--allow-gaps`` etc. on the command line."""

DISTRIBUTION = "luna-nodule"
"""The name on PyPI (``pip install luna-nodule``); ``luna`` there is an unrelated project."""

COMMANDS: dict[str, tuple[str, str]] = {
    # subcommand: (the module whose main(argv) runs it, one line for ``luna --help``)
    "train": ("luna.training.app", "train the segmentation, nodule and malignancy models"),
    "diagnose": ("luna.diagnose.__main__", "find and rate the nodules of one CT or of many (batch, torchrun)"),
    "evaluate": ("luna.evaluate.__main__", "LUNA16 FROC/CPM of a results CSV; malignancy ROC"),
    "series": ("luna.series", "list the series of a data directory with their CT sizes; the validation split"),
    "prepcache": ("luna.prepcache", "cut and cache the chunk of every candidate"),
    "synth": ("luna.synth.cli", "write a synthetic LUNA16-format dataset (phantoms)"),
    "bench": ("luna.bench.__main__", "measure speed, memory and disk use into one JSON"),
}
_PYTHON_M = {"train": "luna.training", "diagnose": "luna.diagnose", "evaluate": "luna.evaluate",
             "series": "luna.series", "prepcache": "luna.prepcache", "synth": "luna.synth", "bench": "luna.bench"}
_launched_by_luna = False  # set by `main`: help and messages then say "luna train", not "python -m luna.training"


def prog(command: str) -> str:
    """How the user called ``command`` (a key of `COMMANDS`): ``luna train`` or ``python -m luna.training``."""
    return f"luna {command}" if _launched_by_luna else f"python -m {_PYTHON_M[command]}"


def version_text() -> str:
    import luna

    return f"luna {luna.__version__} ({DISTRIBUTION}; Python {platform.python_version()})"


# ------------------------------------------------------------------ help text

_DOUBLE_TICKS = re.compile(r"``(.+?)``", re.S)
_ROLE = re.compile(r"(?<![\w`])`([^`\n]+)`(?!`)")


def plain_text(text: str) -> str:
    """Docstring markup as a terminal shows it: ````x```` and ```x``` become x."""
    return _ROLE.sub(r"\1", _DOUBLE_TICKS.sub(r"\1", text))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` for options whose default is worth showing (not None/False, not said already);
    descriptions and help without reStructuredText backticks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


class ArgumentParser(argparse.ArgumentParser):
    """A command's parser: `HelpFormatter`, ``-q``/``-v``/``--version``, and logging set when parsed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        out = self.add_argument_group("messages")
        out.add_argument("-q", "--quiet", action="count", default=0,
                         help="less output: warnings and errors only, no progress bars (-qq: errors only)")
        out.add_argument("-v", "--verbose", action="count", default=0,
                         help="more output: debug messages, each with the logger that wrote it")
        out.add_argument("--version", action="version", version=version_text(), help="print the version and exit")

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        configure_logging(namespace.verbose - namespace.quiet)
        return namespace, rest


def progress_enabled(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: never with ``-q`` (or a command's ``--no-progress``), else
    when stderr is a terminal (in a log file a bar is a line per update, not progress)."""
    if getattr(args, "quiet", 0) > 0 or getattr(args, "no_progress", False):
        return False
    return sys.stderr.isatty()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--cache-dir``, with the defaults of `luna.datadir`."""
    parser.add_argument(
        "--data-dir",
        help="LUNA16-layout data: CSVs at the top, scans in subset*/ or flat "
        "(default: $LUNA_DATA_DIR, else data-unversioned/luna, else the built-in "
        "synthetic dataset in data-unversioned/synthetic)",
    )
    parser.add_argument(
        "--cache-dir",
        help="chunk cache (default: $LUNA_CACHE_DIR, else data-unversioned/cache)",
    )


def add_dicom_arguments(parser: argparse.ArgumentParser) -> None:
    """``--allow-gaps``, ``--allow-nonuniform``, ``--allow-tilt``: what the DICOM reader refuses unless told."""
    group = parser.add_argument_group("DICOM series (each accepted with a warning)")
    for name, help_text in DICOM_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)


def dicom_options(args: argparse.Namespace) -> dict[str, bool]:
    """The `add_dicom_arguments` options as `luna.io.load_ct` keywords."""
    return {name: bool(getattr(args, name)) for name in DICOM_OPTIONS}


# ------------------------------------------------------------------ logging


class _Formatter(logging.Formatter):
    """Messages as plain lines; warnings and errors say so; with -v each names its logger."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.debug:
            return f"{record.levelname.lower()} {record.name}: {text}"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm, so that a log line does not break a progress bar on the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_CHATTY = ("highdicom",)


def configure_logging(verbosity: int = 0) -> None:
    """Root logging for a command: 0 INFO (the default), -1 WARNING (-q), -2 ERROR (-qq), >= 1 DEBUG (-v)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG if verbosity > 0 else logging.ERROR)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter(debug=verbosity > 0))
    root.addHandler(handler)
    root.setLevel(level)
    for name in _CHATTY:  # their INFO lines describe their internals, not the user's work
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity > 0 else logging.WARNING)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``, turning user errors into one line and exit 2."""
    if not any(isinstance(h, _TqdmHandler) for h in logging.getLogger().handlers):
        configure_logging(0)  # until the command's parser applies -q / -v
    try:
        return int(main(argv) or 0)
    except LunaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ the luna command


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: luna <command> [options]     (luna <command> --help for its options)",
        "",
        "End-to-end lung-nodule detection for chest CT (LUNA16 / LIDC-IDRI) on PyTorch.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help   show this help and exit",
        "  --version    print the version and exit",
        "",
        "A first run, on the built-in synthetic data (see the README's quick start):",
        "  luna train --epochs 2 && luna diagnose --run-validation --out val/ && luna evaluate --help",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``luna`` console script: ``luna <command> [options]``."""
    global _launched_by_luna
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help":  # luna help diagnose
            return main([argv[1], "--help"])
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(version_text())
        return 0
    command = argv[0]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean 'luna {close[0]}'?" if close else ""
        print(f"luna: unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    _launched_by_luna = True
    try:
        return run_cli(module.main, argv[1:])
    finally:
        _launched_by_luna = False


if __name__ == "__main__":
    raise SystemExit(main())

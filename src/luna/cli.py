"""What every ``python -m luna.<command>`` shares: data options, logging, error exit.

A `LunaError` (a problem the user can fix) becomes one line on stderr and exit
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from luna.errors import LunaError

__all__ = ["DICOM_OPTIONS", "HelpFormatter", "add_data_arguments", "add_dicom_arguments", "dicom_options", "run_cli"]

DICOM_OPTIONS = {
    "allow_gaps": "read a DICOM series with missing slices, stacked at the median spacing "
                  "(positions past a gap are then off)",
    "allow_nonuniform": "read a DICOM series whose slice spacing varies, stacked at the median spacing",
    "allow_tilt": "read a DICOM series acquired with gantry tilt, with a sheared geometry that keeps "
                  "every slice's position",
}
"""The DICOM reader's options (`luna.io.dicom.read_dicom_series`), as ``--allow-gaps`` etc. on the command line."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options that have a default worth showing (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


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


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``, turning user errors into one line and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(main(argv) or 0)
    except LunaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

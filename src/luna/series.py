"""``luna series`` (``python -m luna.series``): the series of a data directory, their CT sizes, the split.

Prints one line per scan: series uid, voxels (slices x rows x columns), spacing
(x, y, z in mm), which part of the split it is in (training or validation, every
``--val-stride``-th uid sorted, as training splits it) and the file, read from the
image headers only (no voxel data), so listing 888 LUNA16 scans takes seconds.
``--uids-only`` prints the uids alone, one per line: the series list that
``luna diagnose --series-list`` and ``luna evaluate --series`` take; ``--validation``
or ``--training`` keeps one part (``--run RUN_DIR``: the split that run recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from luna.cli import ArgumentParser, add_data_arguments, prog, progress_enabled, run_cli
from luna.errors import LunaError
from luna.fileio import write_atomic

__all__ = ["main"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=prog("series"), description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--validation", action="store_true", help="only the validation series")
    part.add_argument("--training", action="store_true", help="only the training series")
    parser.add_argument("--val-stride", type=int, default=None,
                        help="every N-th series (sorted by uid) validates (default: 10, or the --run's own)")
    parser.add_argument("--run", metavar="RUN_DIR", help="use the split recorded in this training run's run.json")
    parser.add_argument("--uids-only", action="store_true", help="print the uids alone, one per line (a series list)")
    parser.add_argument("--out", metavar="FILE", help="also write the uids to FILE, one per line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from luna.annotations import split_series
    from luna.datadir import resolve_data_dir
    from luna.io.image import read_image_header
    from luna.runs import Run

    args = build_parser().parse_args(argv)
    stride = args.val_stride
    if args.run:
        split = Run(Path(args.run)).split()
        if split is None:
            raise LunaError(f"{args.run}: no split recorded in its run.json; pass --val-stride instead")
        if stride is not None and stride != split["val_stride"]:
            raise LunaError(f"--val-stride {stride} differs from the run's split (val_stride {split['val_stride']})")
        stride = int(split["val_stride"])
    stride = 10 if stride is None else stride
    if stride < 2:
        raise LunaError(f"--val-stride {stride}: must be at least 2")
    data = resolve_data_dir(args.data_dir, progress=progress_enabled(args))
    validation = set(split_series(data.series_uids, stride)[1])
    uids = [u for u in data.series_uids
            if not (args.validation or args.training) or ((u in validation) == bool(args.validation))]
    if args.out:
        write_atomic(Path(args.out), "".join(f"{uid}\n" for uid in uids))
    if args.uids_only:
        print("\n".join(uids))
        return 0
    width = max((len(u) for u in uids), default=10)
    print(f"{'series uid':<{width}}  {'voxels (i x r x c)':>18}  {'spacing x y z mm':>18}  {'part':<10}  file")
    for uid in uids:
        path = data.scan_path(uid)
        try:
            shape, geometry = read_image_header(path)
            size = "x".join(map(str, shape))
            spacing = " ".join(f"{s:.2f}" for s in geometry.spacing_xyz)
        except LunaError as err:
            size, spacing = "unreadable", str(err)[:40]
        part = "validation" if uid in validation else "training"
        print(f"{uid:<{width}}  {size:>18}  {spacing:>18}  {part:<10}  {path}")
    kind = "synthetic phantoms" if data.is_synthetic else "scans"
    print(f"{len(uids)} of {len(data.series_uids)} {kind} in {data.root} (validation: every {stride}th uid, "
          f"{len(validation)} series)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""``python -m luna.bench``: how fast luna is and how much memory and disk it takes.

One command measures every stage a user waits for and writes one JSON file::

    python -m luna.bench --quick          # smoke run, a few minutes
    python -m luna.bench                  # the full suite (README's Performance table)

Sections (each its own module, run in this order, ``--sections`` picks some):

- ``loading`` (`luna.bench.loading`): CT load seconds and memory per scan, MetaImage
  and DICOM;
- ``chunks`` (`luna.bench.chunks`): cold and warm chunk reads, one process and
  DataLoader workers; prepcache candidates/s; cache bytes per candidate;
- ``training`` (`luna.bench.training`): samples/s of the nodule classifier and the
  segmentation UNet in the training app (with the share of time spent waiting for
  data) and of their bare training steps, float32 and autocast; a torch.profiler
  table of the steps;
- ``diagnosis`` (`luna.bench.diagnosis`): per scan, load / segmentation / grouping /
  classification / total seconds and the peak memory, float32 and autocast; a
  cProfile of one diagnosis.

When ``chunks``, ``training`` and ``diagnosis`` ran in the same run, the JSON also
holds ``luna16_projection`` (`luna.bench.scale`): the full LUNA16 (888 scans, 551,065
candidates) projected from their medians, each figure naming its measured input;
``--projection-table BENCH_JSON`` prints it as a Markdown table without measuring.

Data: the synthetic ``bench`` preset (512x512 scans of realistic spacing; generated
into ``data-unversioned/bench`` on first use, 3 scans into
``data-unversioned/bench-quick`` for ``--quick``) or ``--data-dir``. Every figure
is ``{"median", "min", "max", "runs"}`` over repeats (`luna.bench.measure.stats`).
The JSON is rewritten after each section, so an interrupted run keeps what it
measured; the profiles are written beside it.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    from luna.bench.__main__ import main as _main

    return _main(argv)

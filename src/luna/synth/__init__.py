"""A phantom generator that writes exactly the LUNA16 layout (``python -m luna.synth``).

Scans are realistic enough to measure detection quality where the truth is known:
HU-correct anatomy (body wall, ribs, spine, scapulae, sternum, table, heart, great
vessels, trachea and bronchi, diaphragm and upper abdomen), lungs whose shape
changes along z, branching and tapering vessel trees (the main source of false
positives), and solid, part-solid, ground-glass, juxta-pleural and juxta-vascular
nodules with real LUNA16 diameters and LIDC-like malignancy ratings. Candidates mix
each nodule with many non-nodules on vessels, bifurcations, pleura and airways.

- `generate_dataset(out_dir, preset, ...)` writes a dataset and returns its
  `SynthSummary` (the statistics the command prints).
- `ensure_dataset(out_dir, preset)` generates only when no complete dataset is
  there yet (the built-in default when no LUNA16 data is found).

Presets: ``tiny`` (tests, seconds), ``demo`` (the built-in dataset), ``bench``
(512x512, realistic spacing). See `luna.synth.presets`.
"""

from luna.synth.dataset import GENERATOR_VERSION, SynthSummary, ensure_dataset, generate_dataset, is_complete
from luna.synth.presets import PRESETS, Preset


def main(argv=None) -> int:
    """``python -m luna.synth``; see `luna.synth.cli`."""
    from luna.synth.cli import main as _main

    return _main(argv)


__all__ = ["generate_dataset", "ensure_dataset", "is_complete", "SynthSummary", "PRESETS", "Preset",
           "GENERATOR_VERSION", "main"]

"""A phantom generator that writes exactly the LUNA16 layout (``python -m luna.synth``).

Scans are realistic enough to measure detection quality where the truth is known,
and close enough to real CT that a detector trained on them can work on real scans:
HU-correct anatomy (body wall with varying fat and muscle, ribs, spine, scapulae,
sternum, arms down in some patients, mattress and table, heart, great vessels,
trachea and bronchi with walls, fissures, diaphragm and upper abdomen) with partial
volume across thick slices; lungs whose shape changes along z; continuous vessel
trees grown from the hila through the whole chest, at the density and calibre of
real lungs and tapering to the periphery (the main source of false positives);
solid, part-solid, ground-glass, juxta-pleural and juxta-vascular nodules with real
LUNA16 diameters and LIDC-like malignancy ratings; and a scanner model
(`luna.synth.imaging`): resolution, standard and sharp kernels, noise with CT's
band-pass power spectrum, streaks. Candidates mix each nodule with many non-nodules
on vessels, bifurcations, pleura and airways.

- `generate_dataset(out_dir, preset, ...)` writes a dataset and returns its
  `SynthSummary` (the statistics the command prints).
- `ensure_dataset(out_dir, preset)` generates only when no complete dataset is
  there yet (the built-in default when no LUNA16 data is found).
- ``python -m luna.synth --compare-real PATH...`` (`luna.synth.compare`) measures
  real CT and phantoms side by side.

Presets: ``tiny`` (tests, seconds), ``demo`` (the built-in dataset: 512x512 slabs at
0.6-0.9 mm), ``realistic`` (whole chests, for longer training), ``bench`` (whole
chests for ``luna.bench``). See `luna.synth.presets`.
"""

from luna.synth.dataset import GENERATOR_VERSION, SynthSummary, ensure_dataset, generate_dataset, is_complete
from luna.synth.presets import PRESETS, Preset


def main(argv=None) -> int:
    """``python -m luna.synth``; see `luna.synth.cli`."""
    from luna.synth.cli import main as _main

    return _main(argv)


__all__ = ["generate_dataset", "ensure_dataset", "is_complete", "SynthSummary", "PRESETS", "Preset",
           "GENERATOR_VERSION", "main"]

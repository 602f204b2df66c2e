"""luna.models.malignancy: the measures it adds, and that it is a classifier like any other."""

from __future__ import annotations

import numpy as np
import torch

from luna.models import build_model_from_checkpoint, check_kind, make_checkpoint
from luna.models.classifier import NoduleClassifier
from luna.models.malignancy import MEASURE_NAMES, SizeAwareClassifier, chunk_measures


def _ball_chunk(radius: float, hu: float = 40.0) -> torch.Tensor:
    grids = np.meshgrid(*(np.arange(s) - s // 2 for s in (32, 48, 48)), indexing="ij")
    distance = np.sqrt(sum(g.astype(float) ** 2 for g in grids))
    chunk = np.where(distance <= radius, hu, -900.0).astype(np.float32)
    return torch.from_numpy(chunk)[None, None]


def test_measures_follow_size_and_density():
    small, large = chunk_measures(_ball_chunk(3)), chunk_measures(_ball_chunk(9))
    dense = [MEASURE_NAMES.index(f"dense_within_{r}") for r in (2, 6, 12)]
    assert abs(float(small[0, dense[0]]) - 1) < 1e-6 and abs(float(large[0, dense[0]]) - 1) < 1e-6  # solid centres
    assert small[0, dense[1]] < 0.3 < 0.99 < large[0, dense[1]]  # the profile's fall-off is the size
    assert large[0, dense[2]] > small[0, dense[2]]
    calcified = chunk_measures(_ball_chunk(5, hu=600.0))[0, MEASURE_NAMES.index("calcified_within_4")]
    assert abs(float(calcified) - 1.0) < 1e-6 and small[0, MEASURE_NAMES.index("calcified_within_4")] == 0.0


def test_starts_as_the_cnn_and_round_trips_through_a_checkpoint():
    torch.manual_seed(0)
    cnn = NoduleClassifier().eval()
    model = SizeAwareClassifier.from_classifier(cnn).eval()
    x = _ball_chunk(5)
    with torch.no_grad():
        p_cnn = torch.softmax(cnn(x), 1)[:, 1]
        p_model = torch.softmax(model(x), 1)[:, 1]
    torch.testing.assert_close(p_model, p_cnn)
    rebuilt = build_model_from_checkpoint(make_checkpoint(model, stage="malignancy")).eval()
    assert isinstance(check_kind(rebuilt, "classifier", "file", "malignancy"), SizeAwareClassifier)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_fine_tuning_trains_the_head_and_the_last_sections():
    model = SizeAwareClassifier.from_classifier(NoduleClassifier())
    trainable = model.freeze_for_finetuning(1)
    names = {n for n, p in model.named_parameters() if any(p is t for t in trainable)}
    assert {"head.weight", "head.bias", "cnn.head_linear.weight"} <= names
    assert "cnn.block1.conv1.weight" not in names and "block1" in model.frozen_sections


def test_wraps_any_registered_classifier():
    from luna.models.residual import ResidualClassifier

    torch.manual_seed(0)
    base = ResidualClassifier(width=4, depth=3).eval()
    model = SizeAwareClassifier.from_classifier(base).eval()
    assert model.model_args["base"] == "ResidualClassifier"
    rebuilt = build_model_from_checkpoint(make_checkpoint(model, stage="malignancy")).eval()
    x = _ball_chunk(4)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
        torch.testing.assert_close(torch.softmax(model(x), 1), torch.softmax(base(x), 1))

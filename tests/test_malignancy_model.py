"""luna.models.malignancy: the measures it adds, and that it is a classifier like any other."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_diameter_rule_fits_a_logistic_size_effect():
    from luna.models.malignancy import DiameterRule

    rng = np.random.default_rng(0)
    diameters = rng.uniform(4, 30, 400)
    malignant = rng.random(400) < 1 / (1 + np.exp(-0.4 * (diameters - 15)))
    rule = DiameterRule.fit(diameters, malignant)
    assert abs(rule.slope_per_mm - 0.4) < 0.12 and abs(rule.midpoint_mm - 15) < 2
    assert rule.probability([rule.midpoint_mm])[0] == 0.5
    assert np.all(np.diff(rule.probability([5, 10, 20, 30])) > 0)
    # separable sizes still give a finite rule; one class or smaller-is-worse give none
    assert np.isfinite(DiameterRule.fit([5, 6, 20, 25], [0, 0, 1, 1]).slope_per_mm)
    assert DiameterRule.fit([5, 6, 7], [0, 0, 0]) is None
    assert DiameterRule.fit([5, 6, 20, 25], [1, 1, 0, 0]) is None


def test_the_diagnosis_gives_the_diameter_rule_when_the_model_lost_to_it(tmp_path):
    from luna.ct import Ct
    from luna.geometry import Geometry
    from luna.inference.grouping import Detection
    from luna.inference.pipeline import Models, Proposals, classify_proposals, diameter_instead
    from luna.models import save_checkpoint
    from luna.models.malignancy import DiameterRule

    model = SizeAwareClassifier.from_classifier(NoduleClassifier())
    rule = {"slope_per_mm": 0.5, "midpoint_mm": 12.0}

    def stored(auc, diameter_auc, name, **more):
        payload = make_checkpoint(model, metrics={"val": {"auc": auc, "diameter_auc": diameter_auc, **more}})
        return save_checkpoint(tmp_path / name, {**payload, "diameter_rule": rule})

    lost, reason = diameter_instead(stored(0.6, 0.8, "lost.pt"))
    assert lost == DiameterRule(0.5, 12.0) and "0.800" in reason and "0.600" in reason
    assert diameter_instead(stored(0.9, 0.8, "won.pt")) == (None, "")
    assert diameter_instead(stored(float("nan"), 0.8, "one-class.pt")) == (None, "")
    # with the bound on the gain (checkpoints since it was recorded) a win must be beyond chance
    lucky, why = diameter_instead(stored(1.0, 0.85, "lucky.pt", auc_gain_low=0.0))
    assert lucky == DiameterRule(0.5, 12.0) and "beyond chance" in why and "+0.000" in why
    assert diameter_instead(stored(0.95, 0.85, "sure.pt", auc_gain_low=0.02)) == (None, "")
    assert diameter_instead(stored(0.6, 0.8, "no-bound.pt", auc_gain_low=float("nan")))[0] == lucky

    ct = Ct(np.full((40, 64, 64), -800, dtype=np.int16), Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "1.2.3")
    # two detections far enough apart (40 mm) not to be merged as one finding (luna.inference.merge)
    detections = tuple(Detection((x, 32.0, 20.0), (20.0, 32.0, x), 10, 10.0, d, 0.9, 0.9, (0, 0, 0, 1, 1, 1))
                       for x, d in ((10.0, 6.0), (50.0, 20.0)))

    class Accept(torch.nn.Module):  # p(nodule) = 1 for every chunk
        def forward(self, x):
            return torch.tensor([[-10.0, 10.0]]).expand(x.shape[0], 2)

    diagnosis = classify_proposals(ct, Proposals(detections, 0), Models(None, Accept(), model, None, lost, reason))
    assert [n.p_malignant for n in diagnosis.nodules] == pytest.approx(list(lost.probability([6.0, 20.0])))
    assert diagnosis.malignancy_source.startswith("diameter: ")
    assert classify_proposals(ct, Proposals(detections, 0), Models(None, Accept(), model)).malignancy_source == "model"


def test_a_damaged_diameter_rule_is_an_error_naming_the_file_not_nan_probabilities(tmp_path):
    from luna.errors import LunaError
    from luna.inference.pipeline import diameter_instead
    from luna.models import save_checkpoint

    payload = make_checkpoint(SizeAwareClassifier.from_classifier(NoduleClassifier()),
                              metrics={"val": {"auc": 0.5, "diameter_auc": 0.8}})
    for rule in ({"slope_per_mm": float("nan"), "midpoint_mm": 10.0}, {"slope_per_mm": -1.0, "midpoint_mm": 10.0},
                 {"midpoint_mm": 10.0}):
        path = save_checkpoint(tmp_path / "damaged.pt", {**payload, "diameter_rule": rule})
        with pytest.raises(LunaError, match="damaged.pt.*diameter rule"):
            diameter_instead(path)

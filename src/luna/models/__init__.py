"""Models (the 3D nodule / malignancy classifier; the 2D segmentation UNet) and checkpoint I/O.

``luna.models.classifier``: `NoduleClassifier`, the book's ``LunaModel`` layout.
``luna.models.unet``: `SegmentationUNet`, the book's ``UNetWrapper`` layout.
``luna.models.checkpoint``: atomic save, safe load (CPU by default), the book's
format, and rebuilding a model from a file (`build_model_from_checkpoint`).
"""

from luna.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    build_model,
    build_model_from_checkpoint,
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    model_state_from_checkpoint,
    register_model,
    save_checkpoint,
    unwrap_model,
)
from luna.models.classifier import POSITIVE_CLASS, NoduleClassifier
from luna.models.unet import SegmentationUNet  # importing registers it

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "POSITIVE_CLASS",
    "NoduleClassifier",
    "SegmentationUNet",
    "build_model",
    "build_model_from_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "make_checkpoint",
    "model_state_from_checkpoint",
    "register_model",
    "save_checkpoint",
    "unwrap_model",
]

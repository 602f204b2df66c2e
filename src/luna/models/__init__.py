"""Models and their files: the registry and its interfaces, the networks, checkpoint I/O.

``luna.models.registry``: `register_model`, `build_model`, and the written interfaces
(`ChunkClassifier`, `Segmenter`) a model needs to take a role.
``luna.models.classifier``: `NoduleClassifier`, the book's ``LunaModel`` layout.
``luna.models.unet``: `SegmentationUNet`, the book's ``UNetWrapper`` layout.
``luna.models.checkpoint``: atomic save, safe load (CPU by default), the book's
format, and rebuilding a model from a file (`build_model_from_checkpoint`).

Importing this package imports every module in it, and each model module registers
its models (`register_model` at its bottom): a new architecture is one new file
``luna/models/<name>.py``.
"""

import importlib
import pkgutil

from luna.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    build_model_from_checkpoint,
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    model_state_from_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from luna.models.classifier import NoduleClassifier
from luna.models.registry import (
    POSITIVE_CLASS,
    ChunkClassifier,
    Segmenter,
    build_model,
    check_kind,
    models_of_kind,
    register_model,
    registered_models,
)
from luna.models.unet import SegmentationUNet

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "POSITIVE_CLASS",
    "ChunkClassifier",
    "NoduleClassifier",
    "SegmentationUNet",
    "Segmenter",
    "build_model",
    "build_model_from_checkpoint",
    "check_kind",
    "load_checkpoint",
    "load_model_state",
    "make_checkpoint",
    "model_state_from_checkpoint",
    "models_of_kind",
    "register_model",
    "registered_models",
    "save_checkpoint",
    "unwrap_model",
]

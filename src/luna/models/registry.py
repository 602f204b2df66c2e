"""The model registry and the interfaces a model must have to take a role in luna.

Each model module registers its class by name at import (`register_model`, at the
bottom of `luna.models.classifier` and `luna.models.unet`); checkpoints record that
name (``model_name``) and the constructor's keyword arguments (``model_args``), so
`build_model` can rebuild any registered model from a file, and training builds the
classifier named by ``--model``. A registration names the model's *kind*, the role
it can take:

``"classifier"`` -- `ChunkClassifier`: the nodule and the malignancy classifier.
    Input: HU chunks ``(N, 1, *chunk_shape)`` (any real dtype); output: logits
    ``(N, 2)``, column `POSITIVE_CLASS` (1) the positive class. Constructor takes
    ``width`` and ``depth`` keywords (``--width``, ``--depth``). Fine-tuning:
    ``freeze_for_finetuning(depth)`` trains the ``depth`` sections nearest the head
    and returns their parameters; ``frozen_sections`` names the others.
``"segmenter"`` -- `Segmenter`: the segmentation network. Input: HU slices
    ``(N, in_channels, H, W)`` (the slice and its context slices as channels);
    output: probabilities ``(N, 1, H, W)`` in [0, 1]; ``depth`` levels, so ``H`` and
    ``W`` must be multiples of ``2 ** (depth - 1)``.

Both record ``model_args`` (plain values) and may give ``infer_args(state_dict)``
to rebuild files that do not record their arguments (the book's). A new
architecture is one new module that subclasses ``nn.Module``, satisfies one of the
protocols and calls `register_model`, plus an import in `luna.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from luna.errors import LunaError

__all__ = [
    "KINDS",
    "POSITIVE_CLASS",
    "ChunkClassifier",
    "ModelSpec",
    "Segmenter",
    "build_model",
    "check_kind",
    "models_of_kind",
    "register_model",
    "registered_models",
    "spec_for_class",
]

POSITIVE_CLASS = 1
"""Column of a classifier's output that is the positive class (nodule, malignant)."""

KINDS = ("classifier", "segmenter")


@runtime_checkable
class ChunkClassifier(Protocol):
    """A 3D chunk classifier (kind ``"classifier"``); see the module docstring."""

    chunk_shape: tuple[int, int, int]
    model_args: dict

    def __call__(self, chunks: torch.Tensor) -> torch.Tensor: ...

    def freeze_for_finetuning(self, finetune_depth: int) -> list[nn.Parameter]: ...

    @property
    def frozen_sections(self) -> tuple[str, ...]: ...


@runtime_checkable
class Segmenter(Protocol):
    """A 2D slice segmenter (kind ``"segmenter"``); see the module docstring."""

    in_channels: int
    depth: int
    model_args: dict

    def __call__(self, slices: torch.Tensor) -> torch.Tensor: ...


_PROTOCOLS = {"classifier": ChunkClassifier, "segmenter": Segmenter}


@dataclass(frozen=True)
class ModelSpec:
    """A model class known to checkpoints by name.

    ``infer_args(state_dict)`` returns the constructor kwargs a (prefix-free) state
    dict seems to come from, or None when the state dict is not this model's; it is
    used to rebuild models from files that do not record ``model_args`` (the book's,
    bare state dicts) and to explain mismatches.
    """

    name: str
    cls: type[nn.Module]
    kind: str
    infer_args: Callable[[Mapping[str, Any]], dict | None] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    cls: type[nn.Module],
    *,
    kind: str,
    aliases: Iterable[str] = (),
    infer_args: Callable[[Mapping[str, Any]], dict | None] | None = None,
) -> ModelSpec:
    """Make ``cls`` buildable by ``name`` (or an alias) in the role ``kind``.

    ``name`` is what checkpoints record for ``cls``; aliases are other names files
    may carry (the book's class names).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    spec = ModelSpec(name, cls, kind, infer_args)
    for key in (name, *aliases):
        _REGISTRY[key] = spec
    return spec


def registered_models() -> dict[str, ModelSpec]:
    """Name (and alias) -> `ModelSpec`, a copy."""
    return dict(_REGISTRY)


def models_of_kind(kind: str) -> list[str]:
    """Registered names (not aliases) of the models that can take the role ``kind``."""
    return sorted({spec.name for spec in _REGISTRY.values() if spec.kind == kind})


def spec_for_class(cls: type) -> ModelSpec | None:
    for spec in _REGISTRY.values():
        if spec.cls is cls:
            return spec
    return None


def build_model(name: str, model_args: Mapping[str, Any] | None = None, *, source: str = "the checkpoint") -> nn.Module:
    """A fresh model of the registered ``name`` built with ``model_args``."""
    spec = _REGISTRY.get(name)
    if spec is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise LunaError(
            f"{source} holds a model named {name!r}, which luna does not know (known: "
            f"{known}); use a checkpoint of one of those models"
        )
    args = dict(model_args or {})
    try:
        return spec.cls(**args)
    except (TypeError, ValueError) as exc:
        raise LunaError(
            f"{source}: cannot build {name} with model_args {args} ({exc}); the file may "
            f"come from a newer luna (upgrade luna) or have been edited"
        ) from None


def check_kind(model: nn.Module, kind: str, source: str, role: str) -> nn.Module:
    """``model`` if it can take the role ``kind``; else `LunaError` naming ``source`` and ``role``."""
    spec = spec_for_class(type(model))
    ok = spec.kind == kind if spec is not None else isinstance(model, _PROTOCOLS[kind])
    if not ok:
        held = f"a {spec.kind} ({spec.name})" if spec is not None else type(model).__name__
        wanted = ", ".join(models_of_kind(kind)) or kind
        raise LunaError(f"{source} holds {held}, not a {kind} ({wanted}); give the {role} checkpoint here")
    return model

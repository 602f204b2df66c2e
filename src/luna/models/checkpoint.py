"""Checkpoint files: save atomically, load safely on any device, rebuild the model.

Two formats are read, both ``torch.save``-d dicts that keep the model's state dict
under ``model_state``:

The book's ("Deep Learning with PyTorch")
    ``model_state`` (keys may start with ``module.`` when saved from DataParallel),
    ``model_name`` (``"LunaModel"`` for the classifier), ``optimizer_state``,
    ``epoch``, ``totalTrainingSamples_count``, sometimes ``sys_argv``; tensors on
    ``cuda:0``. A bare state dict (a file holding only ``model.state_dict()``) is
    accepted too.

Ours (``format == "luna-checkpoint"``), built by `make_checkpoint`:

    ===================  =====================================================
    ``format``           ``"luna-checkpoint"``
    ``format_version``   `FORMAT_VERSION` (int); bumped when a key changes meaning
    ``luna_version``     ``luna.__version__`` of the writer
    ``model_name``       registry name (`register_model`), e.g. ``"NoduleClassifier"``
    ``model_args``       constructor kwargs (plain values) to rebuild the model
    ``model_state``      state dict, unprefixed keys
    ``optimizer_state``  ``optimizer.state_dict()`` or None
    ``scheduler_state``  ``scheduler.state_dict()`` or None
    ``epoch``            epochs completed (int)
    ``samples_seen``     training samples seen so far (int)
    ``metrics``          dict of validation metrics (plain numbers / strings)
    ``args``             the training arguments (dict of plain values)
    ``stage``            ``"segmentation"``, ``"classifier"``, ``"malignancy"``, ...
    ===================  =====================================================

Every value is a tensor or plain data (numbers, strings, None, lists, tuples,
dicts), so `load_checkpoint` reads our files with ``torch.load(weights_only=True)``,
which cannot run code from the file; `save_checkpoint` converts numpy scalars and
arrays and paths to plain data and refuses other objects, to keep it that way.
The book's files are plain data too. A file that needs full unpickling (it holds
arbitrary Python objects) is refused with an explanation unless the caller
passes ``trust=True``.

Tensors load on the CPU by default (``map_location="cpu"``), so checkpoints saved
on a GPU work on CPU-only machines.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np
import torch
from torch import nn

import luna
from luna.errors import LunaError
from luna.fileio import temporary_path
from luna.models.registry import (
    ModelSpec,
    build_model,
    registered_models,
    spec_for_class,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "build_model_from_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "make_checkpoint",
    "model_state_from_checkpoint",
    "save_checkpoint",
    "unwrap_model",
    "strip_wrapper_prefix",
]

FORMAT = "luna-checkpoint"
FORMAT_VERSION = 1

MapLocation = Union[str, torch.device, Callable, Mapping, None]

# Prefixes that wrappers put before every key: DataParallel / DistributedDataParallel
# ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys listed per kind of mismatch in error messages


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _describe(model: nn.Module) -> str:
    args = getattr(model, "model_args", None)
    if isinstance(args, Mapping):
        return f"{type(model).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
    return type(model).__name__


# --- saving ------------------------------------------------------------------


def make_checkpoint(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int = 0,
    samples_seen: int = 0,
    metrics: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
    stage: str | None = None,
) -> dict:
    """Our checkpoint payload (see the module docstring) for `save_checkpoint`.

    ``model`` may be wrapped (DataParallel, DDP, torch.compile): the inner model's
    state is stored, without prefixes. Its class must be registered.
    """
    target = unwrap_model(model)
    spec = spec_for_class(type(target))
    if spec is None:
        raise TypeError(f"{type(target).__name__} is not registered; call register_model first")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "luna_version": luna.__version__,
        "model_name": spec.name,
        "model_args": dict(getattr(target, "model_args", {})),
        "model_state": target.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "samples_seen": int(samples_seen),
        "metrics": dict(metrics or {}),
        "args": dict(args or {}),
        "stage": stage,
    }


_PLAIN_LEAVES = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _plain(value: Any, where: str) -> Any:
    """``value`` as data that ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, _PLAIN_LEAVES):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        items = ((_plain(k, where), _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
        if not isinstance(value, OrderedDict):
            return dict(items)
        # State dicts are OrderedDicts carrying per-module versions in `_metadata`,
        # which load_state_dict uses to upgrade old layouts: keep both.
        result = OrderedDict(items)
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            result._metadata = _plain(metadata, f"{where}._metadata")
        return result
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"checkpoint value {where} is a {type(value).__qualname__}; checkpoints hold only "
        f"tensors and plain data (numbers, strings, None, lists, tuples, dicts) so that "
        f"they load without unpickling code: convert it first"
    )


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically; returns the path.

    The file is written to a temporary name in the same directory, flushed and
    fsync-ed, then renamed over ``path`` (``os.replace``): a reader, or a run that
    crashes mid-write, sees the old checkpoint or the new one, never half of one,
    and no temporary file is left behind. Parent directories are created.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"a checkpoint payload is a dict, got {type(payload).__name__}")
    path = Path(path)
    data = _plain(payload, "payload")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp: its 0600 mode would end up on the checkpoint; this respects umask.
        # The name is luna.fileio's, so a run killed mid-write leaves a file the next
        # run recognises and removes (remove_stale_temporaries).
        tmp = temporary_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise LunaError(
            f"cannot write checkpoint {path}: {exc.strerror or exc}; choose a writable output directory"
        ) from None
    try:
        with os.fdopen(fd, "wb") as stream:
            torch.save(data, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise LunaError(
                f"cannot write checkpoint {path}: {exc.strerror or exc} (disk full?); the "
                f"previous file there, if any, is unchanged"
            ) from None
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform / filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- loading -----------------------------------------------------------------

_WEIGHTS_ONLY_FAILED = "Weights only load failed"
_UNSUPPORTED_GLOBAL = "Unsupported global"
_UNPICKLER_DETAIL = "WeightsUnpickler error:"


def load_checkpoint(
    path: str | os.PathLike,
    map_location: MapLocation = "cpu",
    *,
    trust: bool = False,
) -> dict:
    """The dict stored in checkpoint ``path``, tensors moved by ``map_location`` (CPU by default).

    Reads with ``torch.load(weights_only=True)``: tensors and plain data only, no
    code from the file runs. A file that holds other Python objects raises
    `LunaError` explaining the risk, unless ``trust=True`` (full unpickling: only
    for files from a trusted source). A whole pickled model (``torch.save(model)``,
    needs ``trust``) comes back as ``{"model_state": ..., "model_name": ...}``.
    Missing, unreadable, truncated or non-PyTorch files raise `LunaError`.
    """
    path = Path(path)
    if not path.exists():
        raise LunaError(f"checkpoint {path} does not exist: check the path (or train a model first)")
    if path.is_dir():
        raise LunaError(f"checkpoint {path} is a directory: give the path of a checkpoint file (.pt)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trust)
    except MemoryError:
        raise
    except PermissionError as exc:
        raise LunaError(f"cannot read checkpoint {path}: {exc.strerror or exc}; check its permissions") from None
    except pickle.UnpicklingError as exc:
        # Only a pickle that names Python classes or functions would run code when
        # fully unpickled; other bytes (a random file, a truncated one, a plain
        # pickle) also fail the weights-only reader, but are no checkpoint at all.
        if _WEIGHTS_ONLY_FAILED in str(exc) and _UNSUPPORTED_GLOBAL in str(exc) and _is_torch_file(path):
            raise LunaError(_untrusted_message(path, str(exc))) from None
        raise LunaError(_corrupt_message(path, exc)) from None
    except (ImportError, AttributeError) as exc:
        if trust:  # full unpickling needs the classes the file names
            raise LunaError(
                f"checkpoint {path} refers to Python code that is not available here ({exc}); "
                f"load it where that code is installed and save its state dict instead"
            ) from None
        raise LunaError(_corrupt_message(path, exc)) from None
    except RuntimeError as exc:
        if "deserialize object on a CUDA device" in str(exc):
            raise LunaError(
                f"checkpoint {path} holds CUDA tensors and this machine has no usable GPU: "
                f"load it with map_location='cpu' (the default)"
            ) from None
        raise LunaError(_corrupt_message(path, exc)) from None
    except Exception as exc:  # torch.load on arbitrary bytes fails in many ways
        raise LunaError(_corrupt_message(path, exc)) from None

    if isinstance(obj, nn.Module):
        module = unwrap_model(obj)
        spec = spec_for_class(type(module))
        converted = {"model_state": module.state_dict(), "model_name": spec.name if spec else type(module).__name__}
        if isinstance(getattr(module, "model_args", None), Mapping):
            converted["model_args"] = dict(module.model_args)
        return converted
    if not isinstance(obj, Mapping):
        raise LunaError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict or state "
            f"dict; save model.state_dict() or a luna checkpoint instead"
        )
    return obj if isinstance(obj, dict) else dict(obj)


# How torch.save's files begin: a zip archive (PyTorch >= 1.6), or the legacy format's
# pickled magic number (protocol 2, a 10-byte long).
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19")


def _is_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            start = stream.read(max(map(len, _TORCH_FILE_STARTS)))
    except OSError:
        return False
    return start.startswith(_TORCH_FILE_STARTS)


def _corrupt_message(path: Path, exc: BaseException) -> str:
    if not _is_torch_file(path):
        detail = "it does not begin as the files torch.save writes do"
    else:
        # torch's messages run on for lines; the first sentence is the informative part,
        # except in the weights-only reader's, which names what it found further down.
        text = str(exc).strip()
        if _UNPICKLER_DETAIL in text:
            text = text.split(_UNPICKLER_DETAIL, 1)[1].strip()
        first = text.split("\n")[0].split(". ")[0][:160]
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return (
        f"checkpoint {path} is not a readable PyTorch checkpoint ({detail}); it may "
        f"be truncated (copy or download interrupted) or another kind of file: copy it "
        f"again or pick another checkpoint"
    )


def _untrusted_message(path: Path, torch_message: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", torch_message)
    what = f" (it contains {found.group(1)})" if found else ""
    return (
        f"checkpoint {path} holds Python objects other than tensors and plain data{what}; "
        f"loading it would run code stored in the file, so luna refuses by default. Only "
        f"if you trust its source: load it with load_checkpoint(..., trust=True), then "
        f"save_checkpoint() it again, which writes plain data only"
    )


# --- state dicts -------------------------------------------------------------


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the ``module.`` (DataParallel/DDP) or ``_orig_mod.`` prefix.

    A prefix is removed only when every key has it (repeatedly, for nested wrappers).
    """
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _check_format(checkpoint: Mapping[str, Any], source: str) -> None:
    if checkpoint.get("format") != FORMAT:
        return
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LunaError(
            f"{source} is a luna checkpoint of format version {version!r}, newer than this "
            f"luna reads ({FORMAT_VERSION}; it was written by luna "
            f"{checkpoint.get('luna_version', '?')}): upgrade luna"
        )


def model_state_from_checkpoint(checkpoint: Mapping[str, Any], *, source: str = "the checkpoint") -> dict:
    """The model's state dict (wrapper prefixes removed) from our format, the book's, or a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise LunaError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    _check_format(checkpoint, source)
    if "model_state" in checkpoint:
        state = checkpoint["model_state"]
        if not _is_state_dict(state):
            raise LunaError(
                f"{source}: its 'model_state' is not a state dict (names -> tensors); the file "
                f"is damaged or not a model checkpoint"
            )
    elif _is_state_dict(checkpoint):
        state = checkpoint
    else:
        keys = ", ".join(map(repr, list(checkpoint)[:8])) or "none"
        raise LunaError(
            f"{source} has no 'model_state' and is not a bare state dict (its keys: {keys}); "
            f"use a checkpoint written by luna training, by the book's code, or a "
            f"file holding model.state_dict()"
        )
    return strip_wrapper_prefix(state)


def _inferred(state: Mapping[str, Any], prefer: ModelSpec | None) -> tuple[ModelSpec, dict] | None:
    specs = [prefer] if prefer is not None else []
    specs += [s for s in dict.fromkeys(registered_models().values()) if s is not prefer]
    for spec in specs:
        if spec.infer_args is not None:
            args = spec.infer_args(state)
            if args is not None:
                return spec, args
    return None


def _shown(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], *, source: str = "the checkpoint") -> None:
    """Load ``state_dict`` into ``model`` with a strict check of names and shapes.

    Wrapper prefixes (``module.``, ``_orig_mod.``) are stripped from the file's keys
    and ``model`` may itself be wrapped. On any mismatch raises `LunaError`
    listing missing keys, unexpected keys and shape differences (the first few
    of each) and the architecture options the file seems to have. A state with NaN or
    infinite values is refused too: such a model outputs NaN whatever its input.
    """
    target = unwrap_model(model)
    if not _is_state_dict(state_dict):
        raise LunaError(f"{source} does not hold a state dict (names -> tensors)")
    state = strip_wrapper_prefix(state_dict)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    # Files from before BatchNorm counted batches lack the counter; it does not
    # affect outputs, so start it at zero instead of refusing the file.
    for key in [k for k in missing if k.endswith("num_batches_tracked")]:
        state[key] = torch.zeros_like(expected[key])
        missing.remove(key)
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} (file {list(state[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        problems = []
        if reshaped:
            problems.append(f"{len(reshaped)} tensors differ in shape: {_shown(reshaped)}")
        if missing:
            problems.append(f"{len(missing)} missing from the file: {_shown(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected in the file: {_shown(unexpected)}")
        guess = _inferred(state, spec_for_class(type(target)))
        if guess is not None:
            spec, args = guess
            shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
            hint = (
                f" The file seems to hold a {spec.name} with {shown}: build the model with "
                f"those options (luna checkpoints record them in model_args, which "
                f"build_model_from_checkpoint uses), or use a checkpoint made for this model."
            )
        else:
            hint = " The file does not look like any model luna knows; use a checkpoint made for this model."
        raise LunaError(f"{source} does not fit {_describe(target)}: {'; '.join(problems)}.{hint}")
    # A NaN or infinite weight makes every output NaN, which downstream reads as "no
    # nodule": refuse the file where it enters instead.
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise LunaError(
            f"{source} holds NaN or infinite values in {len(broken)} tensor(s) ({_shown(broken)}): the "
            f"training that wrote it diverged or the file is damaged; use another checkpoint (an "
            f"earlier one, or train again with a lower --lr)"
        )
    target.load_state_dict(state, strict=True)


def build_model_from_checkpoint(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
    *,
    source: str | None = None,
    map_location: MapLocation = "cpu",
    trust: bool = False,
) -> nn.Module:
    """The model a checkpoint (dict or path) holds, rebuilt and with its weights loaded.

    The architecture comes from ``model_name`` + ``model_args`` in our format;
    for the book's files (``model_name`` only; ``"LunaModel"`` is a
    `NoduleClassifier`) and bare state dicts it is inferred from the tensors'
    shapes. The model is returned in train mode, as a fresh module is: call
    ``.eval()`` for inference. ``map_location`` / ``trust`` apply when a path is given.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or f"checkpoint {os.fspath(checkpoint)}"
        checkpoint = load_checkpoint(checkpoint, map_location, trust=trust)
    source = source or "the checkpoint"
    state = model_state_from_checkpoint(checkpoint, source=source)
    name = checkpoint.get("model_name") if "model_state" in checkpoint else None
    if checkpoint.get("format") == FORMAT:
        model_args = checkpoint.get("model_args")
        if not isinstance(name, str) or not isinstance(model_args, Mapping):
            raise LunaError(
                f"{source}: its model_name {name!r} or model_args {model_args!r} are not what "
                f"luna writes (a name and a dict); the file is damaged"
            )
    elif name is None:
        guess = _inferred(state, None)
        if guess is None:
            raise LunaError(
                f"{source} does not name its model and its tensors match no model luna "
                f"knows ({', '.join(sorted(registered_models()))}); use a checkpoint of one of those"
            )
        name, model_args = guess[0].name, guess[1]
    elif isinstance(checkpoint.get("model_args"), Mapping):
        model_args = checkpoint["model_args"]
    else:
        # The book's files name the class but not its options: read them off the tensors.
        spec = registered_models().get(name) if isinstance(name, str) else None
        model_args = spec.infer_args(state) if spec is not None and spec.infer_args else None
    model = build_model(str(name), model_args, source=source)
    load_model_state(model, state, source=source)
    return model

"""The nodule classifier and checkpoint I/O: the book's layout and files, our format, errors."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import conftest
from luna.errors import LunaError
from luna.models import (
    FORMAT,
    FORMAT_VERSION,
    POSITIVE_CLASS,
    NoduleClassifier,
    build_model,
    build_model_from_checkpoint,
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    model_state_from_checkpoint,
    save_checkpoint,
)

# Written by hand from DESIGN.md ("The book's checkpoints"), in the book's order.
BOOK_KEYS = [
    "tail_batchnorm.weight",
    "tail_batchnorm.bias",
    "tail_batchnorm.running_mean",
    "tail_batchnorm.running_var",
    "tail_batchnorm.num_batches_tracked",
    "block1.conv1.weight",
    "block1.conv1.bias",
    "block1.conv2.weight",
    "block1.conv2.bias",
    "block2.conv1.weight",
    "block2.conv1.bias",
    "block2.conv2.weight",
    "block2.conv2.bias",
    "block3.conv1.weight",
    "block3.conv1.bias",
    "block3.conv2.weight",
    "block3.conv2.bias",
    "block4.conv1.weight",
    "block4.conv1.bias",
    "block4.conv2.weight",
    "block4.conv2.bias",
    "head_linear.weight",
    "head_linear.bias",
]

SMALL = {"width": 2, "depth": 2, "chunk_shape": (8, 12, 12)}


def hu_chunks(n=2, shape=(32, 48, 48), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1000, 1001, (n, 1, *shape), generator=generator, dtype=torch.int16)


def trained_like(model: nn.Module, seed=1) -> nn.Module:
    """Give every parameter and BN statistic non-default values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.add_(noise)
        model.tail_batchnorm.running_mean.fill_(-500.0)
        model.tail_batchnorm.running_var.fill_(250_000.0)
        model.tail_batchnorm.num_batches_tracked.fill_(1234)
    return model


def book_checkpoint(model: nn.Module) -> dict:
    """As the book's classifier training saves it (SGD with momentum, 10 epochs)."""
    return conftest.book_checkpoint(model, model_name="LunaModel", optimizer="SGD", epoch=10, samples=1_000_000,
                                    argv=["--epochs", "10", "--balanced"])


# --- architecture --------------------------------------------------------------


def test_default_model_has_the_books_names_and_shapes():
    model = NoduleClassifier()
    state = model.state_dict()
    assert list(state) == BOOK_KEYS
    assert isinstance(model.tail_batchnorm, nn.BatchNorm3d) and model.tail_batchnorm.num_features == 1
    channels = [1, 8, 16, 32, 64]
    for i in range(1, 5):
        block = getattr(model, f"block{i}")
        for conv, c_in in ((block.conv1, channels[i - 1]), (block.conv2, channels[i])):
            assert isinstance(conv, nn.Conv3d)
            assert (conv.in_channels, conv.out_channels) == (c_in, channels[i])
            assert conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) and conv.bias is not None
    assert isinstance(model.head_linear, nn.Linear)
    assert (model.head_linear.in_features, model.head_linear.out_features) == (1152, 2)


@pytest.mark.parametrize(
    "options, chunk, head_features",
    [
        ({}, (32, 48, 48), 1152),
        ({"width": 4}, (32, 48, 48), 576),
        ({"width": 4, "depth": 3}, (32, 48, 48), 16 * 4 * 6 * 6),
        ({"width": 2, "depth": 2, "chunk_shape": (16, 24, 20)}, (16, 24, 20), 4 * 4 * 6 * 5),
        ({"width": 2, "chunk_shape": [17, 33, 33], "num_classes": 3}, (17, 33, 33), 16 * 1 * 2 * 2),
    ],
)
def test_output_shapes(options, chunk, head_features):
    model = NoduleClassifier(**options)
    assert model.head_linear.in_features == head_features
    logits = model(hu_chunks(3, chunk))
    assert logits.shape == (3, options.get("num_classes", 2))
    assert logits.dtype == torch.float32


def test_input_contract():
    model = NoduleClassifier(**SMALL).eval()
    chunks = hu_chunks(2, SMALL["chunk_shape"])
    with torch.no_grad():
        from_int = model(chunks)
        torch.testing.assert_close(from_int, model(chunks.float()))
        # Values outside the clamped HU range are clamped, as the data pipeline does.
        torch.testing.assert_close(model(chunks.float() * 3), model((chunks.float() * 3).clamp(-1000, 1000)))
        proba = model.predict_proba(chunks)
    torch.testing.assert_close(proba.sum(1), torch.ones(2))
    torch.testing.assert_close(proba[:, POSITIVE_CLASS], torch.softmax(from_int, 1)[:, 1])
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 12, 12\)"):
        model(torch.zeros(2, 1, 8, 12, 13))
    with pytest.raises(ValueError, match="too small"):
        NoduleClassifier(depth=4, chunk_shape=(8, 48, 48))


def test_initialisation():
    torch.manual_seed(0)
    model = NoduleClassifier()
    conv = model.block4.conv2
    fan_in = conv.in_channels * 27
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            assert torch.all(module.bias == 0)
    assert model.tail_batchnorm.weight.item() == 1 and model.tail_batchnorm.bias.item() == 0


# --- the book's checkpoints ------------------------------------------------------


def test_book_checkpoint_loads_with_identical_outputs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    original = trained_like(NoduleClassifier())
    path = tmp_path / "book" / "cls_2020-05-01_12.00.00_final.best.state"
    path.parent.mkdir()
    torch.save(book_checkpoint(original), path)

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    checkpoint = load_checkpoint(path)
    assert calls == [{"map_location": "cpu", "weights_only": True}]
    assert checkpoint["sys_argv"][0] == "training.py"
    assert checkpoint["optimizer_state"]["param_groups"][0]["momentum"] == 0.99

    model = build_model_from_checkpoint(checkpoint, source=str(path))
    assert type(model) is NoduleClassifier and model.model_args["width"] == 8
    chunks = hu_chunks(1)
    original.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(chunks), original(chunks), rtol=0, atol=0)
    # The same through a path, and into a model built by hand.
    fresh = NoduleClassifier()
    load_model_state(fresh, model_state_from_checkpoint(load_checkpoint(path)), source=str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(chunks), original(chunks), rtol=0, atol=0)
    assert type(build_model_from_checkpoint(path)) is NoduleClassifier


def test_checkpoint_saved_from_cuda_loads_on_cpu(tmp_path):
    """Files whose tensors were on cuda:0 (the book's) load here through map_location."""
    serialization = torch.serialization
    registry = getattr(serialization, "_package_registry", None)
    if registry is None or not hasattr(serialization, "register_package"):
        pytest.skip("this torch has no storage-location registry to fake a CUDA save with")
    model = trained_like(NoduleClassifier(**SMALL))
    before = len(registry)
    # Tag every storage as "cuda:0" while saving: the file then reads as one saved on a GPU.
    serialization.register_package(-1000, lambda storage: "cuda:0", lambda storage, location: None)
    fake = [entry for entry in registry if entry[0] == -1000]
    try:
        path = tmp_path / "gpu.pt"
        torch.save({"model_name": "LunaModel", "model_state": model.state_dict(), "epoch": 1}, path)
    finally:
        for entry in fake:
            registry.remove(entry)
    assert len(registry) == before
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
        with pytest.raises(LunaError, match="map_location='cpu'"):
            load_checkpoint(path, map_location=None)
    checkpoint = load_checkpoint(path)
    assert checkpoint["model_state"]["block1.conv1.weight"].device.type == "cpu"
    torch.testing.assert_close(checkpoint["model_state"]["block1.conv1.weight"], model.block1.conv1.weight)


def test_legacy_serialization_format_loads(tmp_path):
    model = NoduleClassifier()
    path = tmp_path / "legacy.state"
    torch.save(book_checkpoint(model), path, _use_new_zipfile_serialization=False)
    loaded = build_model_from_checkpoint(load_checkpoint(path))
    torch.testing.assert_close(loaded.state_dict()["head_linear.weight"], model.head_linear.weight)


def test_bare_state_dict_and_inferred_options(tmp_path):
    model = trained_like(NoduleClassifier(width=4, depth=3))
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    rebuilt = build_model_from_checkpoint(path)
    assert rebuilt.model_args == {"width": 4, "depth": 3, "chunk_shape": [32, 48, 48], "num_classes": 2}
    # The book's name with other options (a reader who changed conv_channels) works too.
    checkpoint = {"model_name": "LunaModel", "model_state": model.state_dict()}
    assert build_model_from_checkpoint(checkpoint).model_args["width"] == 4


# --- our format --------------------------------------------------------------------


def test_our_checkpoint_round_trip(tmp_path):
    model = trained_like(NoduleClassifier(width=4, depth=3, chunk_shape=(16, 24, 24), num_classes=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=100)
    model(hu_chunks(2, (16, 24, 24))).sum().backward()
    optimizer.step()
    scheduler.step()
    payload = make_checkpoint(
        model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=3,
        samples_seen=4800,
        metrics={"loss": np.float32(0.25), "auc": 0.9, "confusion": np.array([[1, 2], [3, 4]])},
        args={"batch_size": 24, "data_dir": Path("/data/luna16"), "sys_argv": sys.argv[:1]},
        stage="classifier",
    )
    path = save_checkpoint(tmp_path / "runs" / "cls" / "best.pt", payload)
    # Our files are plain data: the safest load reads them.
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == FORMAT and checkpoint["format_version"] == FORMAT_VERSION
    assert checkpoint["model_name"] == "NoduleClassifier" and checkpoint["stage"] == "classifier"
    assert checkpoint["metrics"]["loss"] == 0.25 and isinstance(checkpoint["metrics"]["loss"], float)
    assert checkpoint["args"]["data_dir"] == "/data/luna16"
    assert (checkpoint["epoch"], checkpoint["samples_seen"]) == (3, 4800)

    rebuilt = build_model_from_checkpoint(load_checkpoint(path))
    assert rebuilt.model_args == model.model_args
    chunks = hu_chunks(2, (16, 24, 24))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(chunks), model.eval()(chunks), rtol=0, atol=0)
    resumed = torch.optim.Adam(rebuilt.parameters(), lr=1e-3)
    resumed.load_state_dict(checkpoint["optimizer_state"])
    resumed_scheduler = torch.optim.lr_scheduler.OneCycleLR(resumed, max_lr=0.01, total_steps=100)
    resumed_scheduler.load_state_dict(checkpoint["scheduler_state"])
    assert resumed_scheduler.last_epoch == 1


def test_wrapped_model_saves_without_prefix():
    model = NoduleClassifier(**SMALL)
    payload = make_checkpoint(nn.DataParallel(model))
    assert list(payload["model_state"]) == list(model.state_dict())
    wrapped = nn.DataParallel(NoduleClassifier(**SMALL))
    load_model_state(wrapped, {f"module.{k}": v for k, v in model.state_dict().items()})
    torch.testing.assert_close(wrapped.module.head_linear.weight, model.head_linear.weight)


def test_save_refuses_objects_that_would_need_unpickling(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['args'\]\['when'\]"):
        save_checkpoint(tmp_path / "x.pt", {"args": {"when": object()}})
    assert list(tmp_path.iterdir()) == []


def test_newer_format_and_unknown_model_are_refused():
    state = NoduleClassifier(**SMALL).state_dict()
    newer = {"format": FORMAT, "format_version": FORMAT_VERSION + 1, "luna_version": "9.0",
             "model_name": "NoduleClassifier", "model_args": SMALL, "model_state": state}
    with pytest.raises(LunaError, match="upgrade luna"):
        build_model_from_checkpoint(newer, source="new.pt")
    with pytest.raises(LunaError, match="'FancyNet'.*known: .*LunaModel"):
        build_model_from_checkpoint({"model_name": "FancyNet", "model_state": state})
    with pytest.raises(LunaError, match="no 'model_state'.*'epoch'"):
        model_state_from_checkpoint({"epoch": 1}, source="odd.pt")
    with pytest.raises(LunaError, match="cannot build NoduleClassifier"):
        build_model("NoduleClassifier", {"widht": 8})


# --- errors ---------------------------------------------------------------------


def test_mismatched_checkpoint_explains_itself(tmp_path):
    path = tmp_path / "wide.pt"
    save_checkpoint(path, make_checkpoint(NoduleClassifier(width=16)))
    state = model_state_from_checkpoint(load_checkpoint(path))
    with pytest.raises(LunaError) as info:
        load_model_state(NoduleClassifier(), state, source=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "block1.conv1.weight (file [16, 1, 3, 3, 3], model [8, 1, 3, 3, 3])" in message
    assert "width=16" in message and "depth=4" in message
    assert "more" in message  # long lists are cut
    assert "Traceback" not in message and len(message) < 1500

    deeper = NoduleClassifier(width=8, depth=3, chunk_shape=(16, 24, 24)).state_dict()
    with pytest.raises(LunaError, match=r"missing from the file: block4\.conv1\.weight.*depth=3"):
        load_model_state(NoduleClassifier(), deeper, source="three.pt")
    extra = dict(NoduleClassifier().state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(LunaError, match=r"unexpected in the file: extra\.weight"):
        load_model_state(NoduleClassifier(), extra)


def test_unreadable_files(tmp_path):
    with pytest.raises(LunaError, match=r"missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(LunaError, match="is a directory"):
        load_checkpoint(tmp_path)

    good = save_checkpoint(tmp_path / "good.pt", make_checkpoint(NoduleClassifier(**SMALL)))
    data = good.read_bytes()
    for name, content in [("half.pt", data[: len(data) // 2]), ("empty.pt", b""), ("notes.pt", b"hello\n")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LunaError, match=rf"{name} is not a readable PyTorch checkpoint.*truncated"):
            load_checkpoint(tmp_path / name)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model_state": NoduleClassifier(**SMALL).state_dict()}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "half_legacy.pt").write_bytes(legacy.read_bytes()[:1000])
    with pytest.raises(LunaError, match="half_legacy.pt is not a readable"):
        load_checkpoint(tmp_path / "half_legacy.pt")


class Pickled:
    """Stands for any non-data object a pickled file can hold (and run code through)."""

    def __init__(self):
        self.value = 7


def test_files_needing_full_unpickling_need_trust(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"model_state": NoduleClassifier(**SMALL).state_dict(), "extra": Pickled()}, path)
    with pytest.raises(LunaError, match=r"object\.pt holds Python objects.*Pickled.*trust=True"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)["extra"].value == 7

    whole = tmp_path / "whole_model.pt"
    torch.save(NoduleClassifier(**SMALL), whole)
    with pytest.raises(LunaError, match="trust=True"):
        load_checkpoint(whole)
    assert build_model_from_checkpoint(whole, trust=True).model_args["width"] == 2


# --- atomic save -------------------------------------------------------------------


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 half a zip file")
        raise RuntimeError("power cut")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(RuntimeError, match="power cut"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})

    def disk_full(obj, stream, *args, **kwargs):
        stream.write(b"PK")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(LunaError, match=r"model\.pt: No space left on device.*unchanged"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# --- fine-tuning ---------------------------------------------------------------------


def test_finetune_sections_and_parameters():
    model = NoduleClassifier()
    names = [name for name, _ in model.finetune_sections()]
    assert names == ["head_linear", "block4", "block3", "block2", "block1", "tail_batchnorm"]
    assert model.finetune_parameters(1) == list(model.head_linear.parameters())
    assert model.finetune_parameters(2) == [*model.head_linear.parameters(), *model.block4.parameters()]
    assert len(model.finetune_parameters(6)) == len(list(model.parameters()))
    for bad in (0, 7, "2"):
        with pytest.raises(LunaError, match="--finetune-depth"):
            model.finetune_parameters(bad)


def test_finetune_freezes_the_rest():
    torch.manual_seed(0)
    model = NoduleClassifier()
    trainable = model.freeze_for_finetuning(2)
    assert model.frozen_sections == ("block3", "block2", "block1", "tail_batchnorm")
    model.train()  # the training loop calls this every epoch; frozen BN must stay in eval mode
    assert model.training and not model.tail_batchnorm.training
    stats = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("tail_batchnorm.")}

    optimizer = torch.optim.SGD(trainable, lr=0.1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(hu_chunks(2)), torch.tensor([0, 1])).backward()
    optimizer.step()

    trained = {id(p) for p in trainable}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert name.startswith(("head_linear.", "block4.")) and p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert not p.requires_grad and p.grad is None, name
    for key, value in stats.items():
        assert torch.equal(model.state_dict()[key], value), key

    model.unfreeze()
    assert model.frozen_sections == () and all(p.requires_grad for p in model.parameters())
    assert model.tail_batchnorm.training


def test_residual_classifier_is_a_registered_chunk_classifier():
    from luna.models import ChunkClassifier, build_model, build_model_from_checkpoint, check_kind, make_checkpoint
    from luna.models.residual import ResidualClassifier

    torch.manual_seed(0)
    model = build_model("ResidualClassifier", {"width": 4, "depth": 4})
    assert isinstance(model, ChunkClassifier) and check_kind(model, "classifier", "m", "nodule") is model
    x = torch.randn(3, 1, 32, 48, 48) * 300
    assert model.eval()(x).shape == (3, 2)
    rebuilt = build_model_from_checkpoint(make_checkpoint(model, stage="nodule")).eval()
    torch.testing.assert_close(rebuilt(x), model(x))
    # the state dict alone (no model_args) is recognised, the first block's stride too
    for first_stride in (2, 1):
        torch.manual_seed(1)
        layout = build_model("ResidualClassifier", {"width": 4, "depth": 4, "first_stride": first_stride}).eval()
        bare = build_model_from_checkpoint(layout.state_dict()).eval()
        assert isinstance(bare, ResidualClassifier) and bare.model_args["first_stride"] == first_stride
        torch.testing.assert_close(bare(x), layout(x))
    trainable = model.freeze_for_finetuning(2)
    assert model.frozen_sections[:2] == ("block3", "block2") and len(trainable) > 0
    model.train()
    assert not model.block1.bn1.training and model.block4.bn1.training

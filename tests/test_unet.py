"""The segmentation UNet: the book's layout and files, sizes, our checkpoints; the Dice loss."""

import pytest
import torch
from torch import nn

import conftest
from luna.errors import LunaError
from luna.losses import dice_loss, segmentation_loss
from luna.models import (
    NoduleClassifier,
    SegmentationUNet,
    build_model_from_checkpoint,
    load_checkpoint,
    load_model_state,
    make_checkpoint,
    save_checkpoint,
)


def _bn(prefix):
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _conv(prefix):
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _block(prefix):
    """Conv-ReLU-BN-Conv-ReLU-BN: parameters at indices 0, 2, 3, 5."""
    return _conv(f"{prefix}.0") + _bn(f"{prefix}.2") + _conv(f"{prefix}.3") + _bn(f"{prefix}.5")


# Written by hand from DESIGN.md ("The book's checkpoints"), in the book's order:
# input_batchnorm, then the UNet's down path (3 levels), up path (2, deepest first), last.
BOOK_KEYS = (
    _bn("input_batchnorm")
    + _block("unet.down_path.0.block")
    + _block("unet.down_path.1.block")
    + _block("unet.down_path.2.block")
    + _conv("unet.up_path.0.up")
    + _block("unet.up_path.0.conv_block.block")
    + _conv("unet.up_path.1.up")
    + _block("unet.up_path.1.conv_block.block")
    + _conv("unet.last")
)
BOOK_ARGS = dict(in_channels=7, n_classes=1, depth=3, wf=4, padding=True, batch_norm=True, up_mode="upconv")


def hu_slices(n=2, channels=7, size=(64, 64), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1000, 1001, (n, channels, *size), generator=generator, dtype=torch.int16)


def trained_like(model: nn.Module, seed=1, hu_mean=-500.0, hu_var=250_000.0) -> nn.Module:
    """Non-default values everywhere, input statistics in raw HU as the book's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
        model.input_batchnorm.running_mean.fill_(hu_mean)
        model.input_batchnorm.running_var.fill_(hu_var)
        model.input_batchnorm.num_batches_tracked.fill_(4321)
    return model


def book_checkpoint(model: nn.Module) -> dict:
    """As the book's segmentation training saves it (Adam, 20 epochs)."""
    return conftest.book_checkpoint(model, model_name="UNetWrapper", optimizer="Adam", epoch=20, samples=600_000,
                                    argv=["--epochs", "20", "--augmented"])


# --- architecture --------------------------------------------------------------


def test_default_model_has_the_books_names_and_shapes():
    model = SegmentationUNet()
    state = model.state_dict()
    assert list(state) == BOOK_KEYS
    assert model.model_args == {**BOOK_ARGS, "hu_scale": 0.001}
    assert isinstance(model.input_batchnorm, nn.BatchNorm2d) and model.input_batchnorm.num_features == 7
    for i, (c_in, c_out) in enumerate([(7, 16), (16, 32), (32, 64)]):
        block = model.unet.down_path[i].block
        assert [type(m) for m in block] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d] * 2
        assert (block[0].in_channels, block[0].out_channels, block[3].in_channels) == (c_in, c_out, c_out)
        assert block[0].kernel_size == (3, 3) and block[0].padding == (1, 1)
    for j, (c_in, c_out) in enumerate([(64, 32), (32, 16)]):
        up = model.unet.up_path[j]
        assert isinstance(up.up, nn.ConvTranspose2d) and up.up.kernel_size == (2, 2) and up.up.stride == (2, 2)
        assert (up.up.in_channels, up.up.out_channels) == (c_in, c_out)
        assert up.conv_block.block[0].in_channels == c_in  # upsampled + skip
    assert state["unet.last.weight"].shape == (1, 16, 1, 1)


@pytest.mark.parametrize(
    "options, size, out_size",
    [
        ({}, (64, 64), (64, 64)),
        ({}, (512, 512), (512, 512)),
        ({}, (36, 52), (36, 52)),
        ({"depth": 2}, (30, 62), (30, 62)),
        ({"depth": 4, "wf": 3}, (64, 40), (64, 40)),
        ({"up_mode": "upsample"}, (64, 64), (64, 64)),
        ({"batch_norm": False, "n_classes": 2, "in_channels": 3}, (32, 32), (32, 32)),
        # valid convolutions: 64 -> 60 (pool 30) -> 26 (pool 13) -> 9, up 18 -> 14, up 28 -> 24
        ({"padding": False}, (64, 64), (24, 24)),
        ({"padding": False}, (68, 100), (28, 60)),
        ({"padding": False, "up_mode": "upsample", "depth": 2}, (24, 24), (8, 8)),
    ],
)
def test_output_shapes(options, size, out_size):
    model = SegmentationUNet(**options).eval()
    assert model.output_shape(*size) == out_size
    x = hu_slices(1, options.get("in_channels", 7), size)
    with torch.no_grad():
        prob = model(x)
    assert prob.shape == (1, options.get("n_classes", 1), *out_size) and prob.dtype == torch.float32
    assert ((prob >= 0) & (prob <= 1)).all()


def test_layouts_of_the_options():
    keys = list(SegmentationUNet(batch_norm=False).state_dict())
    # Conv-ReLU-Conv-ReLU: convolutions at block.0 and block.2, no batch norms but the input's.
    assert keys[5:9] == _conv("unet.down_path.0.block.0") + _conv("unet.down_path.0.block.2")
    assert sum("running_mean" in k for k in keys) == 1
    keys = list(SegmentationUNet(up_mode="upsample").state_dict())
    assert _conv("unet.up_path.0.up.1")[0] in keys and "unet.up_path.0.up.weight" not in keys
    assert [k for k in SegmentationUNet(depth=4).state_dict() if k.endswith("block.0.weight")][3] == (
        "unet.down_path.3.block.0.weight"
    )


def test_input_contract():
    model = SegmentationUNet(depth=2, wf=2).eval()
    x = hu_slices(2, size=(16, 16))
    with torch.no_grad():
        from_int = model(x)
        torch.testing.assert_close(from_int, model(x.float()))
        torch.testing.assert_close(model(x.float() * 3), model((x.float() * 3).clamp(-1000, 1000)))
        torch.testing.assert_close(torch.sigmoid(model.forward_logits(x)), from_int)
        wild = x.float() * 3
        kept = wild.clone()
        model(wild)
    assert torch.equal(wild, kept)  # clamping and scaling happen on a copy
    with pytest.raises(ValueError, match=r"\(N, 7, H, W\)"):
        model(torch.zeros(1, 5, 16, 16))
    with pytest.raises(ValueError, match="multiple of 2"):
        model(torch.zeros(1, 7, 16, 15))
    with pytest.raises(ValueError, match="multiple of 4"):
        SegmentationUNet().output_shape(64, 66)
    with pytest.raises(ValueError, match="nearest that fit are 64 and 68"):
        SegmentationUNet(padding=False).output_shape(66, 64)
    for bad in [dict(up_mode="nearest"), dict(depth=0), dict(hu_scale=0.0)]:
        with pytest.raises(ValueError):
            SegmentationUNet(**bad)


def test_hu_scale_only_rescales_the_input_statistics():
    """A raw-HU model and a 1/1000 model with statistics divided by 1000 compute the same."""
    raw = trained_like(SegmentationUNet(depth=2, wf=2, hu_scale=1.0)).eval()
    scaled = SegmentationUNet(depth=2, wf=2).eval()
    scaled.load_state_dict(raw.state_dict())
    with torch.no_grad():
        scaled.input_batchnorm.running_mean.div_(1000)
        scaled.input_batchnorm.running_var.div_(1000**2)
        scaled.input_batchnorm.eps = raw.input_batchnorm.eps / 1000**2
        x = hu_slices(2, size=(16, 16))
        torch.testing.assert_close(scaled(x), raw(x), atol=1e-5, rtol=1e-4)


def test_probabilities_near_one_survive_autocast():
    """Under bfloat16 autocast the logits are bfloat16 but the sigmoid is float32: 0.9990 and 0.9995 (the
    operating thresholds' range) stay apart, where a bfloat16 sigmoid rounds both to 1."""
    model = SegmentationUNet(depth=2, wf=2).eval()
    logits = torch.tensor([6.9, 7.6]).view(2, 1, 1, 1)  # p 0.9990, 0.9995
    model.forward_logits = lambda x: logits.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        p = model(hu_slices(2, size=(16, 16)))
    assert p.dtype == torch.float32
    assert p[0].item() == pytest.approx(0.9990, abs=1e-4) and p[1].item() == pytest.approx(0.9995, abs=1e-4)


def test_initialisation():
    torch.manual_seed(0)
    model = SegmentationUNet()
    conv = model.unet.down_path[2].block[3]
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    up = model.unet.up_path[0].up
    assert up.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module is not model.unet.last:
            assert torch.all(module.bias == 0)
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    assert model.unet.last.weight.abs().max() < 0.05
    with torch.no_grad():
        prob = model(hu_slices(2))
    assert (prob - 0.01).abs().max() < 0.005  # every pixel starts at the prior of a nodule voxel


# --- checkpoints -------------------------------------------------------------------


def test_book_checkpoint_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    original = trained_like(SegmentationUNet(hu_scale=1.0))
    path = tmp_path / "seg_2020-05-01_12.00.00_final.best.state"
    torch.save(book_checkpoint(original), path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["model_name"] == "UNetWrapper" and checkpoint["epoch"] == 20

    model = build_model_from_checkpoint(checkpoint, source=str(path))
    assert type(model) is SegmentationUNet
    assert model.model_args == {**BOOK_ARGS, "hu_scale": 1.0}
    x = hu_slices(2)
    original.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    assert type(build_model_from_checkpoint(path)) is SegmentationUNet
    # A bare state dict of a book model is recognised from its tensors.
    bare = tmp_path / "bare.pt"
    torch.save(original.state_dict(), bare)
    assert build_model_from_checkpoint(bare).model_args == {**BOOK_ARGS, "hu_scale": 1.0}


def test_options_are_read_off_a_book_file():
    for options in [dict(depth=2, wf=3), dict(batch_norm=False), dict(up_mode="upsample", in_channels=5)]:
        state = SegmentationUNet(**options).state_dict()
        model = build_model_from_checkpoint({"model_name": "UNetWrapper", "model_state": state})
        assert model.model_args == {**BOOK_ARGS, **options, "hu_scale": 1.0}


def test_our_checkpoint_round_trip_keeps_hu_scale(tmp_path):
    model = trained_like(SegmentationUNet(depth=2, wf=3, up_mode="upsample"), hu_mean=-0.5, hu_var=0.25)
    path = save_checkpoint(tmp_path / "seg" / "best.pt", make_checkpoint(model, epoch=2, stage="segmentation"))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["model_name"] == "SegmentationUNet" and checkpoint["model_args"]["hu_scale"] == 0.001
    rebuilt = build_model_from_checkpoint(path)
    assert rebuilt.model_args == model.model_args and rebuilt.hu_scale == 0.001
    x = hu_slices(2, size=(32, 32))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_mismatched_checkpoint_raises_luna_error():
    state = SegmentationUNet(depth=2).state_dict()
    with pytest.raises(LunaError, match=r"depth=2"):
        load_model_state(SegmentationUNet(), state)
    with pytest.raises(LunaError, match="differ in shape"):
        load_model_state(SegmentationUNet(), SegmentationUNet(wf=3).state_dict())
    # A file named as the book's UNet but holding the classifier's tensors says so.
    classifier = {"model_name": "UNetWrapper", "model_state": NoduleClassifier().state_dict()}
    with pytest.raises(LunaError, match="seems to hold a NoduleClassifier"):
        build_model_from_checkpoint(classifier)


def test_forward_and_backward_of_a_training_batch():
    model = SegmentationUNet().train()
    x = hu_slices(8, size=(64, 64)).float()
    target = torch.zeros(8, 1, 64, 64)
    target[:, :, 28:36, 28:36] = 1
    loss = dice_loss(model(x), target).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.unet.down_path[0].block[0].weight.grad.abs().sum() > 0


# --- the loss ------------------------------------------------------------------------


def square_target(n=2, size=32, side=10):
    target = torch.zeros(n, 1, size, size)
    target[:, :, 5 : 5 + side, 5 : 5 + side] = 1
    return target


def test_perfect_prediction_costs_nothing():
    target = square_target()
    torch.testing.assert_close(dice_loss(target.clone(), target), torch.zeros(2))
    torch.testing.assert_close(dice_loss(target.clone(), target.bool()), torch.zeros(2))


def test_empty_prediction_of_a_nodule_costs_one_plus_the_fn_term():
    target = square_target()  # 100 foreground pixels
    loss = dice_loss(torch.zeros_like(target), target, fn_weight=8.0)
    torch.testing.assert_close(loss, torch.full((2,), 1 - 1 / 101 + 8 * 100 / 101))
    plain = dice_loss(torch.zeros_like(target), target, fn_weight=0.0)
    assert plain.shape == (2,) and plain.tolist() == pytest.approx([1.0, 1.0], abs=0.01)


def test_missing_foreground_costs_more_than_as_many_false_positives():
    target = square_target(1)  # 100 foreground pixels
    missed = target.clone()
    missed[:, :, 5:7, 5:15] = 0  # 20 foreground pixels missed
    extra = target.clone()
    extra[:, :, 20:22, 20:30] = 1  # 20 background pixels claimed
    for fn_weight in (0.0, 8.0):
        miss_cost = dice_loss(missed, target, fn_weight=fn_weight).item()
        fp_cost = dice_loss(extra, target, fn_weight=fn_weight).item()
        if fn_weight == 0:  # plain Dice: about the same price
            assert miss_cost == pytest.approx(fp_cost, rel=0.5)
        else:
            assert miss_cost > 10 * fp_cost
    # the fn term grows with its weight and ignores false positives
    assert dice_loss(extra, target, fn_weight=8.0).item() == pytest.approx(dice_loss(extra, target, fn_weight=0.0).item())


def test_empty_target_and_prediction_cost_nothing():
    empty = torch.zeros(3, 1, 16, 16)
    loss = dice_loss(empty.clone(), empty)
    assert torch.isfinite(loss).all() and loss.abs().max() < 1e-6
    # a little stray probability on an empty slice is cheap, confident false positives are not
    assert dice_loss(torch.full_like(empty, 1e-4), empty).max() < 0.03
    ones = torch.zeros_like(empty)
    ones[:, :, :3, :3] = 1
    assert dice_loss(ones, empty).min() > 0.85


def test_gradients_flow_and_fn_weight_zero_is_plain_dice():
    target = square_target()
    prob = torch.full_like(target, 0.3).requires_grad_()
    loss = dice_loss(prob, target)
    loss.sum().backward()
    assert torch.isfinite(prob.grad).all()
    assert (prob.grad[target.bool()] < 0).all()  # raising p on the foreground lowers the loss
    assert (prob.grad[~target.bool()] > 0).all()
    p = prob.detach()
    overlap, total = (p * target).flatten(1).sum(1), (p + target).flatten(1).sum(1)
    torch.testing.assert_close(dice_loss(p, target, fn_weight=0), 1 - (2 * overlap + 1) / (total + 1))
    with pytest.raises(ValueError):
        dice_loss(p, target[:, :, :5])


def test_segmentation_loss_weighs_a_missed_small_nodule_like_a_missed_large_one():
    # two crops: a 3x3 nodule and a 15x15 one; missing either entirely costs the same miss term
    target = torch.zeros(2, 1, 32, 32)
    target[0, 0, 10:13, 10:13] = 1
    target[1, 0, 5:20, 5:20] = 1
    miss_small, miss_large = target.clone(), target.clone()
    miss_small[0] = 0
    miss_large[1] = 0
    only_miss = [segmentation_loss(p, target, fn_weight=8.0) - segmentation_loss(p, target, fn_weight=0.0)
                 for p in (miss_small, miss_large)]
    assert only_miss[0].item() == pytest.approx(only_miss[1].item(), rel=0.15)
    assert only_miss[0].item() == pytest.approx(8.0 * 0.5 * 9 / 10, rel=1e-4)  # half the crops, 9/(9+eps) missed
    # the batch-wide Dice part still sees the area: missing the large nodule costs more
    assert segmentation_loss(miss_large, target, fn_weight=0.0) > segmentation_loss(miss_small, target, fn_weight=0.0)


def test_segmentation_loss_without_foreground_is_dice_alone():
    empty = torch.zeros(3, 1, 8, 8)
    noisy = torch.full_like(empty, 0.5)
    assert segmentation_loss(noisy, empty, fn_weight=8.0).item() == pytest.approx(
        dice_loss(noisy.reshape(1, -1), empty.reshape(1, -1), fn_weight=0.0).item())
    assert segmentation_loss(empty, empty).item() == 0.0

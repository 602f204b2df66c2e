"""The 3D CNN that scores candidate chunks: nodule vs. not, or malignant vs. benign.

Input: chunks (N, 1, 32, 48, 48) of HU around a candidate (index, row, col),
clamped to [-1000, 1000] and *not* rescaled. The first layer is a batch norm whose
running statistics learn the HU scale, so any other scaling of the input changes
what a trained model sees. Integer (int16) batches are accepted and cast to float.

Output: logits (N, num_classes). Class index 1 is the positive class (nodule for
the nodule classifier, malignant for the malignancy classifier); probabilities
come from `NoduleClassifier.predict_proba`, i.e. ``softmax(logits, 1)[:, 1]`` for
p(positive). The softmax is not a module, so the state dict has no entry for it.

With the default options the module tree and parameter names are exactly those of
the book's ``LunaModel`` (``tail_batchnorm``, ``block1..block4`` each with ``conv1``
and ``conv2``, ``head_linear``), so the book's checkpoints load unchanged
(`luna.models.checkpoint`).

Fine-tuning (the malignancy classifier starts from the nodule classifier) trains
only the ``depth`` sections nearest the head: see `NoduleClassifier.finetune_sections`
and `NoduleClassifier.freeze_for_finetuning`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from luna.ct import CHUNK_SHAPE, DEFAULT_HU_RANGE
from luna.models.finetune import FinetuneSections
from luna.models.registry import POSITIVE_CLASS, register_model

__all__ = ["POSITIVE_CLASS", "ConvBlock", "NoduleClassifier"]

"""Column of the logits / probabilities for 'nodule' (or 'malignant')."""

_HU_MIN, _HU_MAX = DEFAULT_HU_RANGE if DEFAULT_HU_RANGE is not None else (-1000, 1000)


class ConvBlock(nn.Module):
    """Two 3×3×3 convolutions with ReLU, then a 2×2×2 max-pool (halves each side)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=True)
        # In place: the convolutions' backward does not need their outputs, and on
        # our machines every avoided allocation of a large tensor saves page faults.
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.pool(x)


class NoduleClassifier(FinetuneSections, nn.Module):
    """3D CNN on HU chunks; defaults reproduce the book's ``LunaModel`` exactly.

    Args:
        width: channels of ``block1``; each later block doubles them (default 8:
            8, 16, 32, 64).
        depth: number of conv blocks (default 4); each halves the chunk (floor).
        chunk_shape: (index, row, col) size of the input chunks (default 32×48×48);
            the head's input size follows from it (1152 for the defaults).
        num_classes: outputs of the head (default 2; index 1 is the positive class).

    ``model_args`` holds these options as plain values, so a checkpoint can record
    them and `luna.models.checkpoint.build_model` can rebuild the same network.
    """

    def __init__(
        self,
        width: int = 8,
        depth: int = 4,
        chunk_shape: Sequence[int] = CHUNK_SHAPE,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        chunk_shape = tuple(int(s) for s in chunk_shape)
        if len(chunk_shape) != 3:
            raise ValueError(f"chunk_shape must have 3 sides (index, row, col), got {chunk_shape}")
        if width < 1 or depth < 1 or num_classes < 1:
            raise ValueError(
                f"width, depth and num_classes must be >= 1, got {width}, {depth}, {num_classes}"
            )
        reduced = tuple(side >> depth for side in chunk_shape)
        if min(reduced) < 1:
            raise ValueError(
                f"chunk_shape {chunk_shape} is too small for depth {depth}: each of the "
                f"{depth} blocks halves it, so every side must be >= {2 ** depth}"
            )
        self.model_args = {
            "width": int(width),
            "depth": int(depth),
            "chunk_shape": list(chunk_shape),
            "num_classes": int(num_classes),
        }
        self.chunk_shape = chunk_shape
        self.depth = int(depth)

        # Names are the book's: they are the keys of its checkpoints.
        self.tail_batchnorm = nn.BatchNorm3d(1)
        in_channels = 1
        for i in range(1, depth + 1):
            out_channels = width * 2 ** (i - 1)
            setattr(self, f"block{i}", ConvBlock(in_channels, out_channels))
            in_channels = out_channels
        self.head_features = in_channels * reduced[0] * reduced[1] * reduced[2]
        self.head_linear = nn.Linear(self.head_features, num_classes)

        self._frozen_sections: tuple[str, ...] = ()
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal, mode="fan_in", ReLU gain: it keeps the variance of the
        # activations constant through the forward pass. There is no normalisation
        # between the convolutions, so that is what keeps the signal alive at
        # initialisation: with fan_out each channel-doubling conv1 (fan_out = 2 *
        # fan_in) halves the variance, and the head (fan_out = num_classes = 2)
        # would get weights of std 1 over 1152 inputs. Measured on random HU:
        # mean square after block4 6.5 with fan_in, 0.08 with fan_out. Biases start
        # at zero and the batch norm as identity (weight 1, bias 0), the usual
        # choices. The head is the exception: it feeds a softmax, not a ReLU, and
        # Kaiming weights there start with logits of std ~3.6 and a loss of ~2 that
        # the first epochs spend undoing; small weights start at chance (loss ln 2).
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.head_linear.weight, std=0.01)

    @classmethod
    def args_from_state_dict(cls, state_dict: dict) -> dict | None:
        """The constructor options a state dict was made with, as far as it tells; None if not ours.

        Width, depth and num_classes follow from the tensors' shapes. chunk_shape is
        included only when the head's input size is what the default chunk gives:
        otherwise it cannot be told (several chunk shapes give one head size), and
        the default will not fit. Keys must be unprefixed.
        """
        try:
            first = state_dict["block1.conv1.weight"]
            head = state_dict["head_linear.weight"]
        except (KeyError, TypeError):
            return None
        if not (isinstance(first, torch.Tensor) and isinstance(head, torch.Tensor)):
            return None
        if first.dim() != 5 or head.dim() != 2:
            return None
        depth = 0
        while f"block{depth + 1}.conv1.weight" in state_dict:
            depth += 1
        args: dict = {
            "width": int(first.shape[0]),
            "depth": depth,
            "num_classes": int(head.shape[0]),
        }
        last = state_dict.get(f"block{depth}.conv2.weight", first)
        last_channels = int(last.shape[0])
        positions = 1
        for side in CHUNK_SHAPE:
            positions *= side >> depth
        if int(head.shape[1]) == last_channels * positions:
            args["chunk_shape"] = list(CHUNK_SHAPE)
        return args

    def blocks(self) -> list[ConvBlock]:
        """The conv blocks, input side first (``block1`` .. ``block<depth>``)."""
        return [getattr(self, f"block{i}") for i in range(1, self.depth + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for HU chunks (N, 1, *chunk_shape), any real dtype."""
        if x.dim() != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != self.chunk_shape:
            raise ValueError(
                f"expected chunks of shape (N, 1, {', '.join(map(str, self.chunk_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.to(self.tail_batchnorm.weight.dtype).clamp_(_HU_MIN, _HU_MAX)
        else:
            # Idempotent for chunks that were already clamped (as the data
            # pipeline's are); keeps stray inputs in the range the batch norm knows.
            x = x.clamp(_HU_MIN, _HU_MAX)
        x = self.tail_batchnorm(x)
        for block in self.blocks():
            x = block(x)
        return self.head_linear(x.flatten(1))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes); column `POSITIVE_CLASS` (1) is p(nodule).

        Leaves the train/eval mode and grad mode to the caller (use ``model.eval()``
        and ``torch.inference_mode()`` for inference).
        """
        return torch.softmax(self(x), dim=1)

    # --- fine-tuning ---------------------------------------------------------

    def finetune_sections(self) -> list[tuple[str, nn.Module]]:
        """(name, module) from the head backwards: head_linear, block<depth> .. block1, tail_batchnorm.

        ``--finetune-depth N`` trains the first N of these: 1 = only ``head_linear``,
        2 = the head and the last block, ``depth + 1`` = all blocks but not the input
        batch norm (whose statistics describe the HU input, not the task),
        ``depth + 2`` = everything.
        """
        sections: list[tuple[str, nn.Module]] = [("head_linear", self.head_linear)]
        sections += [(f"block{i}", getattr(self, f"block{i}")) for i in range(self.depth, 0, -1)]
        sections.append(("tail_batchnorm", self.tail_batchnorm))
        return sections


register_model(
    "NoduleClassifier",
    NoduleClassifier,
    kind="classifier",
    aliases=("LunaModel",),
    infer_args=NoduleClassifier.args_from_state_dict,
)

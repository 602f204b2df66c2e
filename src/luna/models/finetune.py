"""Fine-tuning by sections: train the few sections nearest a classifier's head, freeze the rest.

A model lists its sections from the head backwards (`finetune_sections`); ``--finetune-depth
N`` trains the first N. Frozen parameters get ``requires_grad = False``, and the batch
norms of frozen sections stay in eval mode through every later ``model.train()``: in
train mode a batch norm normalises with the batch's statistics and updates its running
statistics even with frozen weights, so the "frozen" part would drift towards the
fine-tuning data. `luna.models.classifier.NoduleClassifier` and
`luna.models.residual.ResidualClassifier` share this one implementation.
"""

from __future__ import annotations

import operator

from torch import nn

from luna.errors import LunaError

__all__ = ["FinetuneSections"]


class FinetuneSections:
    """Mixin for an ``nn.Module`` (put it first in the bases) that defines `finetune_sections`."""

    _frozen_sections: tuple[str, ...] = ()

    def finetune_sections(self) -> list[tuple[str, nn.Module]]:
        """(name, module) from the head backwards."""
        raise NotImplementedError

    def _check_finetune_depth(self, finetune_depth: int) -> int:
        most = len(self.finetune_sections())
        try:
            value = operator.index(finetune_depth)
        except TypeError:
            value = 0
        if not 1 <= value <= most:
            raise LunaError(
                f"--finetune-depth {finetune_depth!r} is out of range for this model: use 1 "
                f"(only the head) to {most} (everything); {most - 1} keeps only the input section "
                f"({self.finetune_sections()[-1][0]}) frozen"
            )
        return value

    def finetune_parameters(self, finetune_depth: int) -> list[nn.Parameter]:
        """Parameters of the ``finetune_depth`` sections nearest the head (see `finetune_sections`)."""
        finetune_depth = self._check_finetune_depth(finetune_depth)
        return [
            p
            for _, module in self.finetune_sections()[:finetune_depth]
            for p in module.parameters()
        ]

    def freeze_for_finetuning(self, finetune_depth: int) -> list[nn.Parameter]:
        """Train only the ``finetune_depth`` sections nearest the head; freeze the rest.

        Frozen parameters get ``requires_grad = False`` (no gradients, no optimizer
        updates, and autograd skips the frozen part's weight gradients). Batch
        norms in frozen sections are also kept in eval mode, now and after every
        later ``model.train()``: in train mode a batch norm normalises with the batch's
        statistics and updates its running statistics even with frozen weights, so
        the "frozen" part would drift towards the fine-tuning data and no longer
        compute what it was trained to. Returns the trainable parameters (give
        them to the optimizer). `unfreeze` undoes it.
        """
        trainable = self.finetune_parameters(finetune_depth)
        trainable_ids = {id(p) for p in trainable}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        self._frozen_sections = tuple(
            name for name, _ in self.finetune_sections()[finetune_depth:]
        )
        self.train(self.training)
        return trainable

    def unfreeze(self) -> None:
        """Make every parameter trainable again and let all batch norms follow train()."""
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen_sections = ()
        self.train(self.training)

    @property
    def frozen_sections(self) -> tuple[str, ...]:
        """Names of the sections frozen by `freeze_for_finetuning` (empty if none)."""
        return self._frozen_sections

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self._frozen_sections:
            for module in getattr(self, name).modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

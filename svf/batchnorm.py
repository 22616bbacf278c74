"""Frozen BatchNorm: a subclass that uses its running statistics and never updates them, however it is called.

``svf.freeze_batchnorm`` gives each nn.BatchNorm1d/2d/3d (and each ``svf.fold_batchnorm`` BatchNorm) the frozen
subclass of its class (``FrozenBatchNorm2d`` ...), changing nothing else: the same parameters, buffers, state-dict
keys and module tree. The subclass's ``forward`` and ``train`` keep it in eval mode, so it stays frozen when it is
called as a module, when its ``forward`` is called directly (which skips module hooks; HSNet and DCAMA do that)
and after ``model.train()``. The classes live at module level: a frozen model pickles and deep-copies.
"""
import torch.nn as nn

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "is_frozen_batchnorm"]


class _FrozenBatchNorm:
    """Running statistics used, never updated: eval mode whatever ``train()`` or a caller sets."""

    def forward(self, x):
        self.training = False  # also when someone set ``bn.training = True`` by hand
        return super().forward(x)

    def train(self, mode=True):
        return super().train(False)


class FrozenBatchNorm1d(_FrozenBatchNorm, nn.BatchNorm1d):
    pass


class FrozenBatchNorm2d(_FrozenBatchNorm, nn.BatchNorm2d):
    pass


class FrozenBatchNorm3d(_FrozenBatchNorm, nn.BatchNorm3d):
    pass


FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d, nn.BatchNorm3d: FrozenBatchNorm3d}


def is_frozen_batchnorm(module):
    """Whether ``module`` is a BatchNorm frozen by ``svf.freeze_batchnorm``."""
    return isinstance(module, _FrozenBatchNorm) or bool(getattr(module, "_svf_frozen", False))

"""svf: Singular Value Fine-tuning (NeurIPS 2022), torch only.

Copy this folder into any project (it imports nothing but torch and the standard library). The verbs:

    model = svf.resolver(model)                       # exact SVD of every conv/linear layer
    svf.apply_paper_freezing(backbone)                # layer0/1 frozen, layer2-4: only vector_S trains
    svf.prepare(backbone, ["layer2", "layer3", "layer4"])   # or: resolve those stages + freeze the rest, one call
    svf.check_singular_values_train(model, optimizer) # after backward: S has gradients and is in the optimizer
    svf.print_trainable_parameters(model)
    svf.keep_small_updates(optimizer, model)          # S's tiny updates are not rounded away in float32
    svf.save_adapter(model, "s.pt")                   # S + resolver options + base fingerprint, kilobytes
    model = svf.load_adapter(pretrained_plain_or_resolved, "s.pt")   # no options to repeat
    plain = svf.merge(model)                          # back to the original architecture, exactly
    svf.fold_batchnorm(model)                         # frozen BatchNorm folded into the conv before it (run time)
    svf.load_released_state_dict(model, sd)           # a released SVF checkpoint (ranks rounded to 4) into our layers

The first optimizer step after the freezing verbs warns (SingularValuesNotTrainingWarning) when the singular
values get no gradient or are in no parameter group (svf/checks.py).

``svf.state_dict`` / ``svf.load_state_dict`` are the same adapter as a dict. The low-rank conv converter
is the sibling package ``lrcc`` (``import lrcc``); ``svf.lrcc`` still finds it, with a DeprecationWarning.
"""
from .adapter import load_adapter, load_state_dict, resolver_options, save_adapter, state_dict
from .attention import SVD_MultiheadAttention
from .batchnorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .checks import SingularValuesNotTrainingWarning, check_singular_values_train
from .common import count_parameters, print_trainable_parameters, weight_fingerprint
from .fold import fold_batchnorm, folded_pairs, unfold_batchnorm
from .layers import SVD_Conv1d, SVD_Conv2d, SVD_Conv3d, SVD_Linear, SVDLayer
from .resolver import merge, resolver
from .released import convert_released_state_dict, load_released_state_dict
from .tuning import (apply_paper_freezing, freeze_batchnorm, keep_small_updates,
                     mark_only_singular_values_as_trainable, prepare, singular_value_change, singular_value_parameters)

__all__ = ["SVD_Conv1d", "SVD_Conv2d", "SVD_Conv3d", "SVD_Linear", "SVDLayer", "SVD_MultiheadAttention",
           "resolver", "merge", "weight_fingerprint", "apply_paper_freezing", "freeze_batchnorm", "load_state_dict",
           "mark_only_singular_values_as_trainable", "singular_value_parameters", "state_dict",
           "save_adapter", "load_adapter", "resolver_options",
           "keep_small_updates", "singular_value_change",
           "fold_batchnorm", "unfold_batchnorm", "folded_pairs",
           "count_parameters", "print_trainable_parameters", "prepare", "check_singular_values_train",
           "SingularValuesNotTrainingWarning", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
           "load_released_state_dict", "convert_released_state_dict"]

"""svf: Singular Value Fine-tuning (NeurIPS 2022) and the low-rank conv converter (lrcc), torch only.

Copy this folder into any project. The verbs:

    model = svf.resolver(model)                       # exact SVD of every conv/linear layer
    svf.apply_paper_freezing(backbone)                # layer0/1 frozen, layer2-4: only vector_S trains
    svf.print_trainable_parameters(model)
    svf.keep_small_updates(optimizer, model)          # S's tiny updates are not rounded away in float32
    torch.save(svf.state_dict(model), "s.pt")         # the singular values alone, kilobytes
    svf.load_state_dict(resolved_model, torch.load("s.pt", weights_only=True))
    plain = svf.merge(model)                          # back to the original architecture, exactly
"""
from .attention import SVD_MultiheadAttention
from .layers import SVD_Conv1d, SVD_Conv2d, SVD_Conv3d, SVD_Linear, SVDLayer
from .resolver import merge, resolver, weight_fingerprint
from .tuning import (apply_paper_freezing, freeze_batchnorm, keep_small_updates, load_state_dict,
                     mark_only_singular_values_as_trainable, singular_value_change, singular_value_parameters,
                     state_dict)
from .utils import count_parameters, print_trainable_parameters

__all__ = ["SVD_Conv1d", "SVD_Conv2d", "SVD_Conv3d", "SVD_Linear", "SVDLayer", "SVD_MultiheadAttention", "resolver", "merge",
           "weight_fingerprint", "apply_paper_freezing", "freeze_batchnorm", "load_state_dict",
           "mark_only_singular_values_as_trainable", "singular_value_parameters", "state_dict",
           "keep_small_updates", "singular_value_change",
           "count_parameters", "print_trainable_parameters"]

from . import lrcc  # noqa: E402,F401  (the low-rank conv converter lives in this folder too)

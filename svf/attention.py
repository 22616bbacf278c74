"""``SVD_MultiheadAttention``: nn.MultiheadAttention with its input projection in SVD form.

nn.MultiheadAttention keeps its q/k/v projection as a bare Parameter that its forward reads directly
(``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the key and value sizes
differ). Here each projection becomes an ``SVD_Linear`` child (``in_proj``, or ``q_proj``/``k_proj``/
``v_proj``; the packed projection is factored as one matrix, 3E x E) and the forward reads its weight under
the original name, so the module computes the same function and the singular values train through it.
``out_proj`` is an ordinary Linear that the resolver converts like any other (the forward reads its
``weight``/``bias``, which SVD layers provide). ``to_plain`` folds everything back into the original class.
"""
import torch.nn as nn

__all__ = ["SVD_MultiheadAttention"]

_PROJECTIONS = {"in_proj_weight": "in_proj", "q_proj_weight": "q_proj", "k_proj_weight": "k_proj",
                "v_proj_weight": "v_proj"}


def _projection(name, child):
    def get(self):
        layer = self._modules.get(child)
        return layer.weight if layer is not None else self._parameters.get(name)  # None where MHA has none
    return property(get, doc=f"the merged weight of ``{child}`` (nn.MultiheadAttention reads ``{name}``)")


class SVD_MultiheadAttention(nn.MultiheadAttention):
    in_proj_weight = _projection("in_proj_weight", "in_proj")
    q_proj_weight = _projection("q_proj_weight", "q_proj")
    k_proj_weight = _projection("k_proj_weight", "k_proj")
    v_proj_weight = _projection("v_proj_weight", "v_proj")

    @classmethod
    def convert(cls, attention, decompose):
        """Turn ``attention`` (an nn.MultiheadAttention, changed in place) into this class;
        ``decompose(weight)`` returns the ``SVD_Linear`` of one projection weight."""
        if type(attention) is not nn.MultiheadAttention:
            raise TypeError(f"expected nn.MultiheadAttention, got {type(attention).__name__}")
        layers = {child: decompose(attention._parameters[name])
                  for name, child in _PROJECTIONS.items() if attention._parameters.get(name) is not None}
        for name, child in _PROJECTIONS.items():
            if child in layers:
                del attention._parameters[name]
        attention.__class__ = cls
        for child, layer in layers.items():
            attention.add_module(child, layer)
        return attention

    def to_plain(self):
        """Fold the projections back (in place) and return the plain nn.MultiheadAttention."""
        layers = {name: self._modules.pop(child) for name, child in _PROJECTIONS.items() if child in self._modules}
        self.__class__ = nn.MultiheadAttention
        for name, layer in layers.items():
            plain = layer.to_plain()
            self.register_parameter(name, plain.weight)
        return self

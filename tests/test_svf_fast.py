"""svf's fast paths are exact: frozen SVD layers run one conv with the cached merged weight; trainable
singular values use a custom autograd function whose gradients equal the plain factored form's and which
keeps less for the backward pass."""
import pytest
import torch
import torch.nn as nn

import svf

LAYERS = {
    "conv3x3_stride_bias": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1),
    "grouped_1x3_reflect_same": lambda: nn.Conv2d(8, 16, (1, 3), padding="same", dilation=2, padding_mode="reflect", groups=2),
    "even_kernel_same": lambda: nn.Conv2d(8, 8, 4, padding="same"),
    "depthwise_nobias": lambda: nn.Conv2d(8, 8, 3, groups=8, bias=False),
    "conv1d_circular": lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"),
    "conv3d": lambda: nn.Conv3d(3, 4, 3),
    "linear_3d_input": lambda: nn.Linear(10, 6),
}


def _x(layer, dtype):
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 5, layer.in_features, dtype=dtype)
    return torch.randn((2, layer.in_channels) + (9,) * (layer.weight.dim() - 2), dtype=dtype)


def _factors(m):
    return (m.conv_V, m.conv_U) if hasattr(m, "conv_V") else (m.fc_V, m.fc_U)


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_singular_value_gradients_equal_plain_factored_form(kind, dtype, tol, train_mode):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(dtype)
    m = svf.mark_only_singular_values_as_trainable(svf.resolver(layer)).train(train_mode)
    V, U = _factors(m)
    if U.bias is not None:
        U.bias.requires_grad_(True)
    x = _x(layer, dtype).requires_grad_()
    weight = None

    def grads(fn):
        nonlocal weight
        for t in [x] + list(m.parameters()):
            t.grad = None
        y = fn(x)
        weight = torch.randn_like(y) if weight is None else weight
        (y * weight).sum().backward()
        return [y.detach(), x.grad, m.vector_S.grad] + ([U.bias.grad] if U.bias is not None else [])

    ours = grads(m)
    fn = m(x).grad_fn
    if x.dim() > 2 and isinstance(m, svf.SVD_Linear):  # a Linear runs on 2-D rows, reshaped back outside
        assert type(fn).__name__ == "ViewBackward0"
        fn = fn.next_functions[0][0]
    assert type(fn).__name__ == "_TrainSingularValuesBackward"
    plain = grads(lambda t: U(V(t) * m.vector_S))
    for a, b in zip(ours, plain):
        assert ((a - b).norm() / b.norm()).item() <= tol


def test_output_of_the_trainable_path_can_be_modified_in_place():
    """Swin V2's position MLP is Linear -> ReLU(inplace=True) on 3-D input: a view returned by the custom
    Function itself could not be modified in place."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    m = svf.mark_only_singular_values_as_trainable(svf.resolver(plain))
    x = torch.randn(4, 5, 2)
    y = m(x)
    y.sum().backward()
    assert torch.allclose(y, plain(x), rtol=1e-5, atol=1e-6) and m[0].vector_S.grad.abs().sum() > 0


def test_frozen_layer_runs_one_conv_with_cached_merged_weight():
    torch.manual_seed(0)
    m = svf.resolver(nn.Conv2d(6, 10, 3, padding=1)).requires_grad_(False)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    y = m(x)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"  # a single convolution
    w = m._cached_merged_weight()
    assert m._cached_merged_weight() is w  # cached
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, m.conv_U.bias, padding=1), rtol=0, atol=0)
    with torch.no_grad():
        m.vector_S.mul_(2)  # an in-place change (as an optimizer step or load_state_dict does) invalidates it
    assert m._cached_merged_weight() is not w


class SavedBytes:
    def __init__(self):
        self.storages = {}

    def pack(self, t):
        self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t


def _saved(fn, x):
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        fn(x)
    return sum(counter.storages.values())


def test_trainable_path_keeps_less_for_backward_than_plain_autograd():
    torch.manual_seed(0)
    m = svf.mark_only_singular_values_as_trainable(svf.resolver(nn.Conv2d(64, 64, 3, padding=1)))
    x = torch.randn(2, 64, 32, 32, requires_grad=True)
    ours = _saved(m, x)
    plain = _saved(lambda t: m.conv_U(m.conv_V(t) * m.vector_S), x)
    act = x.numel() * 4
    assert ours < plain - act  # plain autograd also keeps x and h*S
    assert ours <= act + 64 * 64 * 9 * 4 * 2 + 4096  # h, plus the (frozen) factors it references

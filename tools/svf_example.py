"""A one-minute tour of the svf library on a torchvision ResNet-50 with random weights.

    python tools/svf_example.py

Resolves the network into its exact SVD, applies the paper's freezing to layer0..layer4, prints the
trainable-parameter line, checks exactness (resolved and merged vs the original) and saves the
singular values alone.
"""
import os
import sys
import tempfile

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import svf  # noqa: E402


class Stages(nn.Module):
    """torchvision's ResNet regrouped into the FSS stages layer0 (stem) .. layer4."""

    def __init__(self, net):
        super().__init__()
        self.layer0 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))


def main():
    torch.manual_seed(0)
    plain = Stages(torchvision.models.resnet50(weights=None)).eval()
    model = Stages(torchvision.models.resnet50(weights=None))
    model.load_state_dict(plain.state_dict())
    for name in ("layer0", "layer1", "layer2", "layer3", "layer4"):
        setattr(model, name, svf.resolver(getattr(model, name)))
    svf.apply_paper_freezing(model)
    svf.print_trainable_parameters(model)

    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = plain(x)
        err = ((model.eval()(x) - ref).norm() / ref.norm()).item()
        merged = svf.merge(model)
        merr = ((merged(x) - ref).norm() / ref.norm()).item()
    print(f"relative error, resolved vs original: {err:.2e}; merged vs original: {merr:.2e}")

    model.train()
    loss = model(x).square().mean()
    loss.backward()
    with_grad = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None})
    print(f"one backward pass: gradients only on vector_S of {with_grad}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "singular_values.pt")
        svf.save_adapter(model, path)  # S, the resolver options and the base fingerprint
        print(f"svf.save_adapter: {os.path.getsize(path) / 1024:.0f} KiB "
              f"(the backbone itself: {sum(p.numel() * 4 for p in plain.parameters()) / 2**20:.0f} MiB)")
    if max(err, merr) > 1e-5:
        raise SystemExit("exactness check FAILED")
    print("exactness check passed")


if __name__ == "__main__":
    main()

"""PSPNet: BAM's stage-1 base learner, a semantic segmentation net over the base classes (+ background).

Backbone layer4 -> pyramid pooling (bins 1, 2, 3, 6) -> 3x3 conv 512 + BN + ReLU + Dropout(0.1) -> 1x1 conv
to ``num_classes`` (16 on PASCAL-5i, 61 on COCO-20i, background included), as BAM's model/PSPNet.py.
The head is its own module (``PSPHead``) because BAM reuses it, frozen, as its base learner.
"""
import torch.nn as nn
import torch.nn.functional as F

from dataset.splits import IGNORE_LABEL

from .layers import PPM, FrozenInEval, resize

__all__ = ["PSPNet", "PSPHead"]


class PSPHead(nn.Module):
    """PPM + classifier on layer4 features; output (B, num_classes, h, w) at the feature resolution."""

    def __init__(self, in_dim, num_classes, bins=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = PPM(in_dim, in_dim // len(bins), bins)
        ppm_dim = in_dim + (in_dim // len(bins)) * len(bins)
        self.cls = nn.Sequential(
            nn.Conv2d(ppm_dim, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1), nn.Conv2d(512, num_classes, 1))

    def forward(self, feat):
        return self.cls(self.ppm(feat))


class PSPNet(FrozenInEval):
    """``model(img, label=None)``: training with a label returns ``(logits, loss)`` (cross-entropy, ignore 255);
    otherwise logits (B, num_classes, H, W) at the input resolution."""

    def __init__(self, backbone, num_classes, bins=(1, 2, 3, 6)):
        super().__init__()
        self.backbone = backbone
        self.head = PSPHead(backbone.channels["layer4"], num_classes, bins)
        self.num_classes = num_classes
        self.eval_modules = ()  # kept in eval mode by train() (FrozenInEval); build_model adds a frozen backbone

    def forward(self, img, label=None):
        logits = resize(self.head(self.backbone(img)[4]), img.shape[-2:])
        if self.training and label is not None:
            return logits, F.cross_entropy(logits, label.long(), ignore_index=IGNORE_LABEL)
        return logits

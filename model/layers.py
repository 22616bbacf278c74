"""Building blocks shared by the segmentation heads: PPM, ASPP, masked average pooling, the PFENet prior
mask and BAM's Gram-matrix distance. Formulas follow PFENet's and BAM's released code. ``FrozenInEval``
is how every model here keeps its frozen parts (BatchNorm statistics, Dropout) in eval mode."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FrozenInEval", "PPM", "ASPP", "masked_average_pooling", "prior_mask", "gram_matrix", "resize", "capped_bin"]

COSINE_EPS = 1e-7


class FrozenInEval(nn.Module):
    """A module whose ``train()`` leaves the submodules named in ``eval_modules`` in eval mode: a frozen
    network keeps its BatchNorm running statistics (never updated, used in training too) and its Dropout off;
    in the submodules named in ``bn_eval_modules`` only BatchNorm stays in eval mode (Dropout follows train()).
    The one BatchNorm-freezing mechanism of the models here; ``svf.freeze_batchnorm`` is the library's own."""

    eval_modules = ()
    bn_eval_modules = ()  # only the BatchNorm layers of these stay in eval mode (the released ``fix_bn``)

    def train(self, mode=True):
        super().train(mode)
        for name in self.eval_modules:
            getattr(self, name).eval()
        for name in self.bn_eval_modules:
            for m in getattr(self, name).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def resize(x, size):
    """Bilinear resize with align_corners=True, as every PSPNet/PFENet/BAM resize."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def capped_bin(bin_size, feat_hw):
    """Pooled size for a pyramid bin given as an absolute size (PFENet's 60, 30, 15, 8): the size itself,
    capped by the feature map's height/width. At the papers' inputs (473 -> 60x60 features, 641 -> 81x81)
    nothing is capped, so results match PFENet; at small test inputs a 60-bin becomes the identity."""
    return (min(int(bin_size), feat_hw[0]), min(int(bin_size), feat_hw[1]))


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet): adaptive average pooling to each bin, 1x1 conv+BN+ReLU, upsample,
    concatenated with the input (output channels = in_dim + len(bins) * reduction_dim)."""

    def __init__(self, in_dim, reduction_dim, bins=(1, 2, 3, 6)):
        super().__init__()
        self.features = nn.ModuleList(nn.Sequential(
            nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
            nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True)) for b in bins)

    def forward(self, x):
        return torch.cat([x] + [resize(f(x), x.shape[-2:]) for f in self.features], 1)


class ASPP(nn.Module):
    """BAM's ASPP: image-level 1x1 branch, a 1x1 branch and 3x3 branches with dilation 6/12/18, all with
    bias and ReLU, concatenated (5 * channels)."""

    def __init__(self, channels=256):
        super().__init__()

        def branch(k, d):
            return nn.Sequential(nn.Conv2d(channels, channels, k, padding=d if k == 3 else 0,
                                           dilation=d, bias=True), nn.ReLU())
        self.layer6_0 = branch(1, 1)
        self.layer6_1 = branch(1, 1)
        self.layer6_2 = branch(3, 6)
        self.layer6_3 = branch(3, 12)
        self.layer6_4 = branch(3, 18)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        size = x.shape[-2:]
        image_level = self.layer6_0(x.mean((2, 3), keepdim=True)).expand(-1, -1, size[0], size[1])
        return torch.cat([image_level, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], 1)


def masked_average_pooling(feat, mask):
    """Prototype (B, C, 1, 1) = sum(feat * mask) / (sum(mask) + 5e-4) over space (PFENet's Weighted_GAP)."""
    area = mask.sum((2, 3), keepdim=True) + 0.0005
    return (feat * mask).sum((2, 3), keepdim=True) / area


def _float32(fn):
    """Run ``fn`` in float32 with autocast off: its sums over h*w positions overflow float16 and its
    epsilons vanish in it."""
    def wrapped(*tensors):
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            return fn(*(t.float() for t in tensors))
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


@_float32
def prior_mask(query_feat, support_feat, support_mask):
    """PFENet's training-free prior (B, 1, h, w): for each query position the highest cosine similarity to any
    masked support position (high-level, layer4 features), min-max normalised per image."""
    b, c, h, w = query_feat.shape
    s = support_feat * resize(support_mask, support_feat.shape[-2:])
    q = query_feat.reshape(b, c, -1)
    s = s.reshape(b, c, -1).permute(0, 2, 1)
    similarity = torch.bmm(s, q) / (torch.bmm(s.norm(2, 2, True), q.norm(2, 1, True)) + COSINE_EPS)
    similarity = similarity.max(1)[0]
    lo, hi = similarity.min(1, keepdim=True)[0], similarity.max(1, keepdim=True)[0]
    similarity = (similarity - lo) / (hi - lo + COSINE_EPS)
    return similarity.reshape(b, 1, h, w)


@_float32
def gram_matrix(feat):
    """Normalised Gram matrix (B, C, C) of the channel vectors (BAM's get_gram_matrix)."""
    b, c = feat.shape[:2]
    f = feat.reshape(b, c, -1)
    norm = f.norm(2, 2, True)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + 1e-7)

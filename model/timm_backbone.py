"""Any timm model as a few-shot backbone: ``backbone: timm:<name>`` (e.g. ``timm:vit_small_patch14_dinov2``).

The timm model lives whole in ``backbone.net`` (state-dict keys ``net.`` + timm's own names), without its
classifier. Which of its outputs play ``layer0 .. layer4`` is the rule of its family (``model.backbones.FAMILIES``
holds one entry per family; docs/training.md states each rule):

- ``timm-vit`` (timm's ``vision_transformer``, ``eva``, ``deit``: DINOv2 ``vit_*_patch14_dinov2*``, DINOv3
  ``vit_*_patch16_dinov3*``, plain ViT/DeiT, EVA): ``ViTBackbone``. ``layer0`` = patch embedding, class/register
  tokens, position embedding (absolute or rotary) and ``norm_pre``; the blocks are split in four equal runs,
  ``layer1`` = blocks [0, d/4), ``layer2`` = [d/4, d/2), ``layer3`` = [d/2, 3d/4), ``layer4`` = [3d/4, d) plus the
  final ``norm`` (d = depth, boundaries rounded). The feature of ``layerK`` is the output of its last block through
  the final ``norm`` (the patch tokens only, as a map); every feature has the embedding width and stride = the
  patch size. The image is resized (bilinear) to the nearest multiple of the patch size in each dimension (halves
  rounded up; at least one patch), so the patch grid covers it exactly; the heads upsample their logits to the input size.
- ``timm-hierarchical`` (``convnext``, ``swin_transformer``, ``swin_transformer_v2``) and ``timm-cnn`` (any other
  timm model with ``feature_info``: ResNets, EfficientNets, RegNets ...): ``FeatureBackbone``. The model's trunk is
  walked in order as timm's ``features_only`` does (its children, the stage containers expanded, up to the last
  ``feature_info`` module); ``layer1 .. layer4`` end at the last four ``feature_info`` modules and ``layer0`` is
  everything before them (ResNet: conv1, bn1, act1, maxpool; ConvNeXt: the stem; Swin: the patch embedding).
  Widths and strides are ``feature_info``'s; timm ResNets are built with ``output_stride=8`` (layer3/4 dilated,
  timm's rule = torchvision's), as the paper's backbones.

``finetune_stages`` takes ``layer0 .. layer4`` or module paths of the timm model: ``blocks.6-11`` (blocks 6 to 11
inclusive), ``blocks.3``, ``stages.2``, ``patch_embed.proj``.

Weights (``model.weights.load_backbone_weights``): a timm / Hugging Face hub ``.safetensors`` or ``.pth`` state dict
of the same model (also the original DINOv2 release files: timm's own ``checkpoint_filter_fn`` renames them), or a
checkpoint of this project; the classifier keys are dropped, every other key must match. ``pretrained: hub``
lets timm download its own weights (a machine that reaches the Hugging Face hub).
"""
import difflib
import importlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import STAGES

__all__ = ["PREFIX", "HUB", "timm_name", "timm_module", "create", "ViTBackbone", "FeatureBackbone"]

PREFIX = "timm:"
HUB = "hub"  # `pretrained: hub`: timm downloads the weights of the name itself
_HEAD_PARTS = ("head", "fc_norm", "head_drop", "attn_pool", "fc", "global_pool")  # classifier parts, dropped
_RANGE = re.compile(r"^(?P<path>.+)\.(?P<first>\d+)-(?P<last>\d+)$")


def timm_name(backbone):
    """``vit_small_patch14_dinov2`` of ``timm:vit_small_patch14_dinov2``."""
    return backbone[len(PREFIX):]


def timm_module(name):
    """The timm module (``vision_transformer``, ``eva``, ``resnet`` ...) defining model ``name``; one line when timm
    has no such model."""
    import timm
    if not timm.models.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"backbone=timm:{name}: timm {timm.__version__} has no model {name!r}; {hint}"
                         f"list them with python -c \"import timm; print(timm.list_models('*dinov2*'))\"")
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def create(name, hub=False, **kwargs):
    """``timm.create_model(name)`` without classifier (``num_classes=0``); ``hub``: with timm's own pretrained
    weights (downloaded)."""
    import timm
    try:
        return timm.create_model(name, pretrained=hub, num_classes=0, **kwargs)
    except TypeError as exc:  # an option the model's class does not take
        raise ValueError(f"backbone=timm:{name}: timm.create_model rejects backbone_kwargs {kwargs}: {exc}") from None


def _drop_children(net, names):
    """Replace the children ``names`` of ``net`` (its classifier parts) by nn.Identity; return the state-dict key
    prefixes they had (dropped from weight files, as the ImageNet classifier of the other backbones)."""
    dropped = []
    for name in names:
        child = getattr(net, name, None)
        if isinstance(child, nn.Module):
            dropped.append(f"{name}.")
            setattr(net, name, nn.Identity())
    return tuple(dropped)


class TimmBackbone(nn.Module):
    """What both timm backbones share: stages as parameter-name prefixes, ``finetune_stages`` parsing, weights."""

    chains_stages = False  # a stage's feature is not the next stage's input: BAM's base learner runs from the image
    channels_last = False

    def __init__(self, backbone_name, net, family, module, dropped):
        super().__init__()
        self.name = backbone_name
        self.family = family
        self.timm_module = module
        self.net = net
        self.dropped_prefixes = dropped
        self.dilation_rule = None
        self._stages = {}  # stage -> list of module paths / parameter names inside net

    # ---- stages ------------------------------------------------------------------------------------------
    def _members(self, spec):
        """Module paths (and direct parameter names) of ``net`` that ``spec`` names: a stage or a module path."""
        if spec in self._stages:
            return self._stages[spec]
        match = _RANGE.match(spec)
        if match:
            container = self._module(match["path"], spec)
            first, last = int(match["first"]), int(match["last"])
            if not (isinstance(container, (nn.ModuleList, nn.Sequential)) and first <= last < len(container)):
                size = len(container) if isinstance(container, (nn.ModuleList, nn.Sequential)) else 0
                raise ValueError(f"finetune_stages entry {spec!r}: {self.name}'s {match['path']} has modules 0-"
                                 f"{size - 1}; give a range inside it")
            return [f"{match['path']}.{i}" for i in range(first, last + 1)]
        self._module(spec, spec)
        return [spec]

    def _module(self, path, spec):
        try:
            return self.net.get_submodule(path)
        except AttributeError:
            containers = [n for n, m in self.net.named_children() if isinstance(m, (nn.ModuleList, nn.Sequential))]
            raise ValueError(f"finetune_stages entry {spec!r}: {self.name} has no module {path!r}; use layer0..layer4 "
                             f"or a module path of the timm model (e.g. {containers[0] + '.0-1' if containers else 'norm'}"
                             f"; its containers: {containers})") from None

    def stage_prefixes(self, spec):
        """Parameter-name prefixes (ending in '.') or exact names of the stage / module path ``spec``."""
        params = dict(self.net.named_parameters(recurse=False))
        return tuple(f"net.{m}" if m in params else f"net.{m}." for m in self._members(spec))

    def stage_modules(self, spec):
        """(name in the backbone, module) of every module of ``spec`` (direct parameters left out)."""
        params = dict(self.net.named_parameters(recurse=False))
        return [(f"net.{m}", self.net.get_submodule(m)) for m in self._members(spec) if m not in params]

    def svf_excluded(self, specs):
        """Layers left plain under SVF: every conv/linear layer outside the tuned ``specs`` (nothing trains there)."""
        tuned = [f"net.{m}" for s in specs for m in self._members(s)]
        kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
        return [n for n, m in self.named_modules() if isinstance(m, kinds)
                and not any(n == t or n.startswith(t + ".") for t in tuned)]

    def _stage_trains(self, stage):
        prefixes = self.stage_prefixes(stage)
        return any(p.requires_grad for n, p in self.named_parameters()
                   if any(n == q or (q.endswith(".") and n.startswith(q)) for q in prefixes))

    def _run(self, stage, x, fn):
        """``fn(x)`` with autograd only when the stage trains or its input carries a gradient."""
        if (torch.is_tensor(x) and x.requires_grad) or self._stage_trains(stage):
            return fn(x)
        with torch.no_grad():
            return fn(x)

    # ---- weights -----------------------------------------------------------------------------------------
    def file_state(self, state, path):
        """A weight file's state dict in this backbone's names (``net.`` + timm's); the classifier dropped."""
        if all(k.startswith("net.") for k in state):  # saved from this backbone
            return dict(state)
        module = importlib.import_module(f"timm.models.{self.timm_module}")
        convert = getattr(module, "checkpoint_filter_fn", None)  # timm's own renaming of release files
        name = self.name[len(PREFIX):]
        if convert is not None:
            try:
                state = convert(dict(state), self.net)
            except Exception as exc:  # a file of another model trips timm's conversion
                raise ValueError(f"backbone weights file {path!r} is not a {name} state dict (timm's conversion "
                                 f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}); use the "
                                 f"weights of {name}") from None
        state = {k: v for k, v in state.items() if not k.startswith(self.dropped_prefixes)}
        own = {k[len("net."):] for k in self.state_dict()}
        found = len(own & set(state))
        if found < len(own) / 2:
            missing = sorted(own - set(state))[:3]
            raise ValueError(f"backbone weights file {path!r} holds another model's weights: only {found} of the "
                             f"{len(own)} tensors of timm {name} are in it (missing e.g. {missing}); use the "
                             f"weights file of {name} (docs/training.md, \"Weights files\")")
        return {"net." + k: v for k, v in state.items()}

    def describe(self):
        spans = ", ".join(f"{s} = {self._span(s)}" for s in STAGES)
        strides = "/".join(str(self.strides[s]) for s in STAGES)
        return f"{self.name} ({self.family}): {spans}; strides {strides}; widths " + \
            "/".join(str(self.channels[s]) for s in STAGES)

    def _span(self, stage):
        members = self._stages[stage]
        return members[0] if len(members) == 1 else f"{members[0]} .. {members[-1]}"


class ViTBackbone(TimmBackbone):
    """A timm VisionTransformer / Eva with the ``timm-vit`` rule (module doc)."""

    def __init__(self, backbone_name, net, family, module):
        dropped = _drop_children(net, _HEAD_PARTS)
        super().__init__(backbone_name, net, family, module, dropped)
        depth = len(net.blocks)
        if depth < 4:
            raise ValueError(f"backbone={backbone_name}: {depth} blocks; the timm-vit rule splits the blocks in four "
                             "stages (layer1-4) and needs at least 4")
        patch = tuple(net.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"backbone={backbone_name}: patch {patch} is not square; the timm-vit rule needs square "
                             "patches")
        self.patch = patch[0]
        bounds = [round(depth * k / 4) for k in range(5)]
        self.block_ranges = list(zip(bounds[:-1], bounds[1:]))
        trunk = {"blocks", "norm"} | {n.rstrip(".") for n in dropped}
        embed = [n for n, _ in net.named_children() if n not in trunk]
        embed += [n for n, _ in net.named_parameters(recurse=False)]
        self._stages = {"layer0": embed}
        for stage, (a, b) in zip(STAGES[1:], self.block_ranges):
            self._stages[stage] = [f"blocks.{i}" for i in range(a, b)]
        self._stages["layer4"] = self._stages["layer4"] + ["norm"]
        width = net.embed_dim
        self.channels = dict.fromkeys(STAGES, width)
        self.strides = dict.fromkeys(STAGES, self.patch)
        self.output_stride = self.patch
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 1))

    def fit(self, x):
        """The image resized to the nearest multiple of the patch size (at least one patch) in each dimension."""
        size = tuple(max(self.patch, int(s / self.patch + 0.5) * self.patch) for s in x.shape[-2:])  # halves up
        if size == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def _embed(self, x):
        net = self.net
        x = net.patch_embed(x)
        out = net._pos_embed(x)
        rope = None
        if isinstance(out, tuple):  # Eva: (tokens, rotary embedding); patch dropout inside
            x, rope = out
        else:
            x = net.patch_drop(out) if hasattr(net, "patch_drop") else out
        return net.norm_pre(x), rope

    def _blocks(self, x, rope, first, last):
        mixed = getattr(self.net, "rope_mixed", False)  # depth-dependent rotary embeddings
        for i in range(first, last):
            block = self.net.blocks[i]
            if rope is None:
                x = block(x)
            else:
                x = block(x, rope=rope[i] if mixed else rope)
        return x

    def _map(self, tokens, h, w):
        spatial = self.net.norm(tokens)[:, self.num_prefix_tokens:]
        return spatial.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def forward(self, x, layer4_mask=None):
        """The five features [layer0 .. layer4] (N, C, H/p, W/p); ``layer4_mask`` (N, 1, H, W) multiplies the patch
        tokens that layer4 reads (PFENet/BAM's masked support features)."""
        x = self.fit(x)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens, rope = self._run("layer0", x, self._embed)
        npt = self.num_prefix_tokens
        feats = [tokens[:, npt:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)]
        for stage, (a, b) in zip(STAGES[1:], self.block_ranges):
            if stage == "layer4" and layer4_mask is not None:
                mask = F.interpolate(layer4_mask, size=(h, w), mode="bilinear", align_corners=True)
                tokens = torch.cat([tokens[:, :npt], tokens[:, npt:] * mask.flatten(2).transpose(1, 2)], 1)
            tokens = self._run(stage, tokens, lambda t: self._blocks(t, rope, a, b))
            feats.append(self._run(stage, tokens, lambda t: self._map(t, h, w)))
        return feats


class FeatureBackbone(TimmBackbone):
    """A timm CNN or hierarchical transformer with the ``timm-cnn`` / ``timm-hierarchical`` rule (module doc)."""

    def __init__(self, backbone_name, net, family, module):
        info = list(getattr(net, "feature_info", None) or [])
        if len(info) < 4:
            raise ValueError(f"backbone={backbone_name}: timm gives {len(info)} feature levels (feature_info); the "
                             f"{family} rule needs 4 (layer1-4)")
        info = info[-4:]
        wanted = [f["module"] for f in info]
        trunk = []
        for name, child in net.named_children():
            if len(trunk) and trunk[-1] == wanted[-1]:
                break
            if name in wanted or not any(w.startswith(name + ".") for w in wanted):
                trunk.append(name)
            else:  # a stage container (stages, layers): its children in order
                trunk += [f"{name}.{sub}" for sub, _ in child.named_children()]
        if trunk and wanted[-1] in trunk:
            trunk = trunk[:trunk.index(wanted[-1]) + 1]
        missing = [w for w in wanted if w not in trunk]
        if missing:
            raise ValueError(f"backbone={backbone_name}: timm's feature module {missing[0]!r} is not on the model's "
                             "sequential trunk; this model needs timm's hook-based features_only, which is not "
                             "supported here")
        top = {t.split(".")[0] for t in trunk}
        dropped = _drop_children(net, [n for n, _ in net.named_children() if n not in top])
        super().__init__(backbone_name, net, family, module, dropped)
        ends = [trunk.index(w) for w in wanted]
        self._stages = {"layer0": trunk[:ends[0]] + [n for n, _ in net.named_parameters(recurse=False)]}
        starts = [ends[0]] + [e + 1 for e in ends[:-1]]
        for stage, a, b in zip(STAGES[1:], starts, ends):
            self._stages[stage] = trunk[a:b + 1]
        self.trunk = {s: [m for m in self._stages[s] if m in trunk] for s in STAGES}
        self.nhwc = getattr(net, "output_fmt", "NCHW") == "NHWC"
        self.channels = {s: f["num_chs"] for s, f in zip(STAGES[1:], info)}
        self.strides = {s: f["reduction"] for s, f in zip(STAGES[1:], info)}
        with torch.no_grad():  # layer0's width and stride: one look at a small image
            probe = net.training
            net.eval()
            out = self._stage("layer0", torch.zeros(1, 3, 64, 64))
            net.train(probe)
        out = self._as_nchw(out)
        self.channels["layer0"] = out.shape[1]
        self.strides["layer0"] = 64 // out.shape[-1]
        self.channels = {s: self.channels[s] for s in STAGES}
        self.strides = {s: self.strides[s] for s in STAGES}
        self.output_stride = self.strides["layer4"]

    def _stage(self, stage, x):
        for name in self.trunk[stage]:
            x = self.net.get_submodule(name)(x)
        return x

    def _as_nchw(self, x):
        return x.permute(0, 3, 1, 2) if self.nhwc else x

    def forward(self, x, layer4_mask=None):
        """The five features [layer0 .. layer4] (N, C, H/s, W/s); ``layer4_mask`` multiplies layer4's input."""
        feats = []
        for stage in STAGES:
            if stage == "layer4" and layer4_mask is not None:
                size = x.shape[1:3] if self.nhwc else x.shape[-2:]
                mask = F.interpolate(layer4_mask, size=size, mode="bilinear", align_corners=True)
                x = x * (mask.permute(0, 2, 3, 1) if self.nhwc else mask)
            x = self._run(stage, x, lambda t, s=stage: self._stage(s, t))
            feats.append(self._as_nchw(x))
        return feats

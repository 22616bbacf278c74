"""Strict loading of pretrained weights into a backbone, and of this project's checkpoints into a model.

The strict check itself (every key and shape must match) and the reading of a file's state dict (the DDP
``module.`` prefix rule included) are ``engine.checkpoint``'s, shared with the training and test checkpoints;
this module adds the renaming of ImageNet backbone files.

Accepted files (read with ``torch.load(..., weights_only=True)``, or ``safetensors`` for ``*.safetensors``):

- PSPNet/PFENet's ``resnet50_v2.pth`` / ``resnet101_v2.pth`` (deep stem: keys ``conv1 bn1 conv2 bn2 conv3 bn3``,
  ``layer1..layer4``, ``fc``) and torchvision ResNet state dicts (``conv1 bn1``, ``layer1..4``, ``fc``):
  the stem keys move under ``layer0.``; the ImageNet classifier ``fc.*`` is dropped.
- torchvision VGG16-bn state dicts (``features.N``, ``classifier``): ``features.N`` moves to its stage
  (PFENet's split); ``classifier.*`` is dropped. torchvision Swin state dicts the same way (``model/swin.py``'s
  split); ``norm.*`` and ``head.*`` (the classifier) are dropped.
- timm backbones (``backbone: timm:<name>``, model/timm_backbone.py): the model's timm / Hugging Face hub state
  dict, ``.safetensors`` or ``.pth`` (original DINOv2 release files too, renamed by timm's own
  ``checkpoint_filter_fn``); the classifier parts (``head``, ``fc_norm``, ``fc`` ...) are dropped. A file of another
  model is one line saying so.
- this project's checkpoints: a raw state dict, or a dict with a ``model`` / ``state_dict`` entry (what the
  engine saves); for a backbone only the ``backbone.*`` part is used (e.g. a stage-1 PSPNet checkpoint).

Anything else missing or unexpected is a ValueError that lists the keys and names the file: weights that
silently fail to load are the most common way an FSS result is quietly wrong.
"""
import os

import torch

from engine.checkpoint import load_state_dict_strict, state_dict_from, torch_load

from .backbones import _VGG_SPLIT

__all__ = ["load_backbone_weights", "read_state_dict", "load_state_dict_strict", "WEIGHTS_HELP"]

WEIGHTS_HELP = ("Where backbone weights come from: resnet50_v2.pth / resnet101_v2.pth (deep-stem ResNets) are "
                "PSPNet/PFENet's released ImageNet weights (the 'initmodel' folder linked from PFENet's README); "
                "vgg16_bn.pth is torchvision's vgg16_bn (VGG16_BN_Weights.IMAGENET1K_V1); resnet50_tv takes "
                "torchvision's resnet50 weights (ResNet50_Weights.IMAGENET1K_V1) and swin_t/s/b torchvision's "
                "Swin_T/S/B_Weights.IMAGENET1K_V1 files, from torchvision's model zoo; timm:<name> takes the model's "
                "timm weights (model.safetensors of huggingface.co/timm/<name>.<tag>, e.g. timm/"
                "vit_small_patch14_dinov2.lvd142m), or pretrained=hub to let timm download them. "
                "Put the file at the path given by `pretrained` in the config, or set `pretrained: null` "
                "for random initialisation (tests and demos only).")

_STEM_KEYS = ("conv1.", "bn1.", "conv2.", "bn2.", "conv3.", "bn3.")
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def read_state_dict(path, what="weights", hint=WEIGHTS_HELP):
    """The tensor dict stored in ``path``: a raw state dict, or the ``model``/``state_dict`` entry of a
    checkpoint dict; a DDP ``module.`` prefix on every key is removed. ``hint`` completes the
    file-not-found message (where such a file comes from)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path!r}. {hint}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path, what)
    return state_dict_from(torch_load(path, what), path, what)  # torch_load: a clear error for unreadable files


def _read_safetensors(path, what):
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # installed with timm, whose hub weights use it
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{what} file {path!r} is not a readable safetensors file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}); download it again") from None


def _to_backbone_keys(state, backbone, path):
    """Rename a file's keys to ``backbone``'s own names; classifier keys are dropped."""
    split = getattr(backbone, "features_split", _VGG_SPLIT)  # torchvision features.N -> its stage
    classifier = getattr(backbone, "classifier_prefixes", _CLASSIFIER_PREFIXES)
    if any(k.startswith("backbone.") for k in state):  # this project's model checkpoint: take its backbone
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if hasattr(backbone, "file_state"):  # a timm backbone: timm's names, its own conversion
        return backbone.file_state(state, path)
    if any(k.startswith("layer0.") for k in state):  # a backbone state dict saved by this project
        return dict(state)
    out = {}
    for k, v in state.items():
        if k.startswith(classifier):
            continue
        if k.startswith("features."):  # torchvision VGG/Swin: features.N -> layerS.(N - start of stage S)
            idx, rest = k[len("features."):].split(".", 1)
            idx = int(idx)
            stage = next((s for s in range(5) if split[s] <= idx < split[s + 1]), None)
            if stage is None:
                out[k] = v  # outside the stages: reported as unexpected
            else:
                out[f"layer{stage}.{idx - split[stage]}.{rest}"] = v
        elif k.startswith(_STEM_KEYS):  # ResNet stem (deep or 7x7) lives in layer0
            out["layer0." + k] = v
        else:
            out[k] = v
    return out


def load_backbone_weights(backbone, path):
    """Load ImageNet (or stage-1) weights from ``path`` into ``backbone`` (a plain, not yet SVF-converted,
    ``model.backbones.Backbone``), strictly. Returns the backbone."""
    state = read_state_dict(path, what="backbone weights")
    hint = ("check that the file is for this architecture/backbone (and was saved without SVF)"
            if not hasattr(backbone, "file_state") else f"use the weights of {backbone.name[len('timm:'):]} itself")
    return load_state_dict_strict(backbone, _to_backbone_keys(state, backbone, path), path, what="backbone weights",
                                  hint=hint)

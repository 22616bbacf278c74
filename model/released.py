"""Checkpoints written by the released code, converted exactly into this project's models.

Recognised automatically from their keys (a ``module.`` prefix from DistributedDataParallel is removed;
``{'epoch', 'state_dict', 'optimizer'}`` files are read through their ``state_dict``):

- ``svf_bam``: the SVF code's BAM (zechao-li/SVF-few-shot-segmentation, model/BAM.py): ``layer0..layer4``
  (SVD layers ``conv_U``/``conv_V``/``vector_S`` when it was trained with SVF), the untouched stage-1 copy
  ``layer0p..layer4p``, ``learner_base`` (PPM + classifier) and the meta-learner heads;
- ``bam``: BAM's own few-shot checkpoint (chunbolang/BAM): the same without ``layer0p..layer4p``;
- ``svf_baseline``: the SVF code's baseline (model/aspp.py): BAM's meta-learner alone;
- ``pfenet``: PFENet's own checkpoint or the SVF code's model/pfenet.py (same keys);
- ``pspnet``: BAM's stage-1 PSPNet (``initmodel/PSPNet/<benchmark>/split<N>/<backbone>/best.pth``):
  ``layer0..layer4``, their alias ``encoder.0..4``, ``ppm``, ``cls``; loaded as ``base_learner``.

What the conversion does, and nothing else:
- renames: ``layer0.<i>`` -> the stem's named children (``layer0.conv1`` ...); ``layer<N>p`` -> BAM's
  ``base_backbone.layer<N>`` (the original backbone the base learner reads); the heads' released names
  (``learner_base.0/1``, ``ASPP_meta``, ``res2_meta.0/2`` ...) -> ours (``base_learner.ppm/cls``,
  ``meta.aspp``, ``meta.res2.0.0/1.0`` ...);
- every released SVD layer is folded into its plain weight ``U·diag(S)·Vᵀ`` (float64) and resolved again by
  ``svf.resolver``, the function every SVF model of this project is built with. The released code rounds
  ranks down to multiples of 4 (the 3->64 stem conv keeps 24 of 27 singular values); folding keeps exactly
  that truncated function;
- drops only what the released forward never reads, and says so: aliases of the same tensors
  (``encoder.N`` of PSPNet, ``layer<N>p`` of a BAM trained without SVF, both checked equal) and the
  baseline's ``kshot_rw`` (built for K > 1 but not used by model/aspp.py's forward).
Any other key is an error that lists it; the result is loaded with strict key and shape checks.
"""
import re

import torch

import svf

from .weights import load_state_dict_strict

__all__ = ["FORMATS", "detect_format", "convert_released", "load_released", "released_state"]

FORMATS = {
    "svf_bam": ("bam", "the SVF code's BAM checkpoint (model/BAM.py: layer0-4, layer0p-4p, learner_base, "
                       "meta-learner)"),
    "bam": ("bam", "BAM's own few-shot checkpoint (layer0-4, learner_base, meta-learner)"),
    "svf_baseline": ("baseline", "the SVF code's baseline checkpoint (model/aspp.py: BAM's meta-learner alone)"),
    "pfenet": ("pfenet", "a PFENet checkpoint (PFENet's own or the SVF code's model/pfenet.py)"),
    "pspnet": ("pspnet", "BAM's stage-1 PSPNet checkpoint (layer0-4, encoder, ppm, cls)"),
}

# released head name -> ours, first matching prefix wins (regular expressions on the whole key)
_META = [(r"init_merge\.", "meta.init_merge."), (r"ASPP_meta\.", "meta.aspp."), (r"res1_meta\.", "meta.res1."),
         (r"res2_meta\.0\.", "meta.res2.0.0."), (r"res2_meta\.2\.", "meta.res2.1.0."), (r"cls_meta\.", "meta.cls."),
         (r"down_query\.", "down_query."), (r"down_supp\.", "down_supp.")]
_HEADS = {
    "svf_bam": _META + [(r"learner_base\.0\.", "base_learner.ppm."), (r"learner_base\.1\.", "base_learner.cls."),
                        (r"gram_merge\.", "gram_merge."), (r"cls_merge\.", "cls_merge."), (r"kshot_rw\.", "kshot_rw.")],
    "svf_baseline": _META,
    "pfenet": [(r"down_query\.", "down_query."), (r"down_supp\.", "down_supp."), (r"init_merge\.", "init_merge."),
               (r"alpha_conv\.", "alpha_conv."), (r"beta_conv\.(\d+)\.0\.", r"beta_conv.\1.0.0."),
               (r"beta_conv\.(\d+)\.2\.", r"beta_conv.\1.1.0."), (r"inner_cls\.", "inner_cls."),
               (r"res1\.", "res1."), (r"res2\.0\.", "res2.0.0."), (r"res2\.2\.", "res2.1.0."), (r"cls\.", "cls.")],
    "pspnet": [(r"ppm\.", "head.ppm."), (r"cls\.", "head.cls.")],
}
_HEADS["bam"] = _HEADS["svf_bam"]
_UNUSED = {"svf_baseline": r"kshot_rw\."}  # built by the released model, never read by its forward

_SVD_PARTS = ("conv_U.weight", "conv_U.bias", "conv_V.weight", "vector_S")


def released_state(obj):
    """The tensor dict of a loaded released file (a raw state dict or ``obj['state_dict']``), ``module.``
    prefixes removed; None if ``obj`` is not shaped like one."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def detect_format(state):
    """The name of the released layout of ``state`` (a key of ``FORMATS``), or None for anything else
    (this project's own checkpoints have ``backbone.*`` keys and are never taken for a released one)."""
    keys = list(state)
    if any(k.startswith("backbone.") for k in keys) or not any(k.startswith("layer0.") for k in keys):
        return None

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)
    if has("learner_base."):
        return "svf_bam" if has("layer0p.") else "bam"
    if has("alpha_conv."):
        return "pfenet"
    if has("ASPP_meta."):
        return "svf_baseline"
    if has("ppm.") and has("cls.") and not has("down_query."):
        return "pspnet"
    return None


def _stem_names(backbone):
    """Released ``layer0`` is an nn.Sequential of the stem's modules in order: index -> our child name."""
    return list(backbone.layer0._modules)


def _rename_backbone(key, stem):
    """``layer<N>[p].rest`` -> ``layer<N>.rest``, with ``layer0.<index>`` -> ``layer0.<stem[index]>``; None if
    the key does not fit."""
    m = re.match(r"layer0p?\.(\d+)\.(.*)$", key)
    if m:
        index = int(m.group(1))
        return f"layer0.{stem[index]}.{m.group(2)}" if index < len(stem) else None
    m = re.match(r"(layer[1-4])p?\.(.*)$", key)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _rename_head(key, fmt):
    for pattern, repl in _HEADS[fmt]:
        if re.match(pattern, key):
            return re.sub("^" + pattern, repl, key)
    return None


def _resolve_folded(target_layer, parts):
    """Fold a released SVD layer ``parts`` (conv_U/conv_V/vector_S) into its plain weight and resolve it again into
    a layer shaped like ``target_layer`` (this project's SVD layer): its state (``svf.convert_released_state_dict``,
    the one place of the rule)."""
    return svf.convert_released_state_dict(target_layer, parts)[0]


def _convert_backbone(state, model, src, dst, report):
    """Map the released stage keys ``layer<N><src>.*`` (``src`` '' or 'p', BAM+SVF's copy) into ``model``'s
    backbone under ``dst`` (``backbone.`` / ``base_backbone.``); SVD layers are folded and resolved again.
    Returns {our key: tensor}; consumes the keys from ``state``."""
    target = model.get_submodule(dst.rstrip("."))
    stem = _stem_names(target)
    own = target.state_dict()
    modules = dict(target.named_modules())
    out, svd_layers, truncated = {}, {}, []
    for key in [k for k in state if re.match(rf"layer[0-4]{src}\.", k)]:
        ours = _rename_backbone(key, stem)
        if ours is None:
            raise ValueError(f"released key {key} maps to nothing in this model's {dst.rstrip('.')}")
        for part in _SVD_PARTS:
            if ours.endswith("." + part):
                svd_layers.setdefault(ours[:-len(part) - 1], {})[part] = state.pop(key)
                break
        else:
            out[dst + ours] = state.pop(key)
    for name, parts in svd_layers.items():
        if "conv_U.weight" not in parts or "conv_V.weight" not in parts or "vector_S" not in parts:
            raise ValueError(f"released SVD layer {name} is incomplete: has only {sorted(parts)}")
        layer = modules.get(name)
        if not isinstance(layer, svf.SVDLayer):
            raise ValueError(f"the file holds SVF factors (conv_U/conv_V/vector_S) for {name} but this model's "
                             f"{dst}{name} is {'missing' if layer is None else 'a plain layer'}: "
                             "build it with svf=true")
    factors = {f"{name}.{part}": t for name, parts in svd_layers.items() for part, t in parts.items()}
    converted, cut = svf.convert_released_state_dict(target, factors)
    out.update({dst + k: v for k, v in converted.items()})
    truncated = [f"{name} (rank {released} of {ours})" for name, (released, ours) in cut.items()]
    if any(k.endswith("conv_V.weight") for k in own) and not svd_layers:
        raise ValueError(f"the file's {src or ''}backbone has plain convolutions (no SVF factors) but this model "
                         f"was built with svf=true: build it with svf=false")
    line = f"layer0{src}-layer4{src} -> {dst.rstrip('.')}: {len(out)} tensors (layer0.<i> -> the stem's names)"
    if svd_layers:
        line += (f", {len(svd_layers)} SVD layers folded into U·diag(S)·Vᵀ and resolved again by svf.resolver"
                 + (f"; truncated by the released code: {', '.join(truncated)}" if truncated else ""))
    report.append(line)
    return out


def _drop_aliases(state, alias, twin_of, what, dropped):
    """Remove the keys matching ``alias`` that repeat another key (``twin_of(key)``): the same module saved
    twice under two names. Each must be present and equal, else the file is not what it claims to be."""
    for key in [k for k in state if re.match(alias, k)]:
        twin = twin_of(key)
        if twin not in state or not torch.equal(state[twin], state[key]):
            raise ValueError(f"released key {key} should repeat {twin} ({what}) but "
                             f"{'that key is missing' if twin not in state else 'the tensors differ'}")
        del state[key]
        dropped[what] = dropped.get(what, 0) + 1


def _shared_stages(model, out):
    """BAM+SVF: 2 if the SVF backbone's layer0/1 in ``out`` compute what base_backbone's do (so the base path may
    reuse their output), else 0 (the released SVF stem keeps 24 of 27 singular values, its copy all 27)."""
    def close(a, b):
        return a is not None and b is not None and (a.double() - b.double()).norm() <= 1e-5 * b.double().norm() + 1e-7

    for stage in ("layer0", "layer1"):
        svf_stage = model.backbone.get_submodule(stage)
        for name, mod in model.base_backbone.get_submodule(stage).named_modules():
            if any(True for _ in mod.children()):
                continue
            p, q = f"backbone.{stage}.{name}.", f"base_backbone.{stage}.{name}."
            if isinstance(svf_stage.get_submodule(name), svf.SVDLayer):
                u, v, s = out[p + "conv_U.weight"].double(), out[p + "conv_V.weight"].double(), out[p + "vector_S"]
                r = s.shape[1]
                folded = (u.reshape(u.shape[0], r) * s.double().reshape(1, r)) @ v.reshape(r, -1)
                pairs = [(folded, out[q + "weight"].reshape(folded.shape))]
                if q + "bias" in out:
                    pairs.append((out.get(p + "conv_U.bias"), out[q + "bias"]))
            else:
                pairs = [(out.get(p + k), out.get(q + k)) for k in mod.state_dict()
                         if not k.endswith("num_batches_tracked")]
            if not all(close(a, b) for a, b in pairs):
                return 0
    return 2


def convert_released(obj, model, path="<file>"):
    """Convert a loaded released file ``obj`` for ``model`` (built by ``model.build_model`` for the matching
    arch): returns ``(state_dict, format, report_lines)``; the state dict loads with strict checks.
    Raises ValueError (naming ``path``) for a file that is not a released layout, an arch or svf mismatch,
    or a key that maps nowhere."""
    state = released_state(obj)
    fmt = detect_format(state) if state is not None else None
    if fmt is None:
        raise ValueError(f"{path!r} is not a checkpoint of the released SVF/BAM/PFENet code (formats: "
                         + "; ".join(f"{k}: {v[1]}" for k, v in FORMATS.items()) + ")")
    arch = FORMATS[fmt][0]
    own_arch = type(model).__name__.lower()
    if own_arch != arch:
        raise ValueError(f"{path!r} is {FORMATS[fmt][1]}: evaluate it with arch={arch} (this model is {own_arch})")
    state = dict(state)
    if arch == "bam":  # the file's K-shot reweighting says which shot it was trained with
        file_shot = state["kshot_rw.0.weight"].shape[1] if "kshot_rw.0.weight" in state else 1
        if file_shot != model.shot:
            raise ValueError(f"{path!r} is a {file_shot}-shot BAM (its kshot_rw) but this model was built for "
                             f"shot={model.shot}: set shot={file_shot} (and no other --shot)")
    report, dropped = [f"{path}: {FORMATS[fmt][1]}"], {}
    if fmt == "pspnet":
        _drop_aliases(state, r"encoder\.[0-4]\.", lambda k: re.sub(r"^encoder\.(\d)", r"layer\1", k),
                      "encoder.N (repeats layerN)", dropped)
    if fmt == "svf_bam" and not any(".conv_U." in k for k in state if k.startswith("layer")):
        # trained without SVF: layer<N>p is the very same module as layer<N>
        _drop_aliases(state, r"layer[0-4]p\.", lambda k: k.replace("p.", ".", 1),
                      "layerNp (repeats layerN: trained without SVF)", dropped)
    if fmt in _UNUSED:
        unused = [k for k in state if re.match(_UNUSED[fmt], k)]
        for key in unused:
            del state[key]
        if unused:
            dropped[f"{_UNUSED[fmt][:-2]} (unused by the released forward)"] = len(unused)

    out = _convert_backbone(state, model, "", "backbone.", report)
    if any(re.match(r"layer[0-4]p\.", k) for k in state):
        if not hasattr(model, "base_backbone") or model.base_backbone is None:
            raise ValueError(f"{path!r} holds the base learner's own backbone copy (layer0p-4p, BAM+SVF) but this "
                             "model has no base_backbone: build it with svf=true")
        base = _convert_backbone(state, model, "p", "base_backbone.", report)
        out.update(base)
        out["base_shared_stages"] = torch.tensor(_shared_stages(model, out))
        shared = int(out["base_shared_stages"]) == 2
        report.append("base learner reads base_backbone (the stage-1 backbone); it "
                      + ("reuses the SVF backbone's layer0/1 output (identical stages)" if shared
                         else "runs its own layer0/1 (the SVF stem was truncated)"))
    elif getattr(model, "base_backbone", None) is not None:
        raise ValueError(f"{path!r} has no layer0p-4p (the base learner's backbone copy of BAM+SVF); this model "
                         "was built with svf=true: build it with svf=false")
    heads, unmapped = 0, []
    for key in list(state):
        ours = _rename_head(key, fmt)
        if ours is None:
            unmapped.append(key)
        else:
            out[ours] = state.pop(key)
            heads += 1
    if unmapped:
        raise ValueError(f"{path!r} ({FORMATS[fmt][1]}): {len(unmapped)} keys map to nothing in this project's "
                         f"{arch}: {sorted(unmapped)}")
    report.append(f"heads: {heads} tensors renamed to this project's names")
    if dropped:
        report.append("dropped: " + "; ".join(f"{n} {what}" for what, n in dropped.items()))
    rule = getattr(model.backbone, "dilation_rule", None)
    if rule is not None:
        report.append(f"dilation rule: {rule}" + (" (PFENet's own checkpoints need dilation_rule=every_block, the "
                                                  "SVF code's pfenet.py torchvision)" if fmt == "pfenet" else ""))
    return out, fmt, report


def load_released(model, obj, path="<file>"):
    """Convert the loaded released file ``obj`` (see ``convert_released``) and load it into ``model`` with strict
    key and shape checks; returns ``(format, report_lines)``."""
    state, fmt, report = convert_released(obj, model, path)
    load_state_dict_strict(model, state, path, what=f"converted {fmt} checkpoint")
    return fmt, report

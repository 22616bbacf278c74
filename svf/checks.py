"""Do the singular values train? Checked once, automatically, at the first optimizer step, and on request.

The common way SVF silently does nothing: the backbone runs under ``torch.no_grad()`` or its features are
``.detach()``ed (most few-shot segmentation codebases do this for their frozen backbone), or the optimizer is
built from explicit parameter groups that do not include S. Training then runs, the loss falls (the heads
train) and not one singular value ever changes.

``svf.apply_paper_freezing``, ``svf.mark_only_singular_values_as_trainable`` and ``svf.prepare`` register the
module they freeze (a weak reference). One global optimizer step pre-hook looks, at the first step of an
optimizer that holds any parameter of a registered module (its singular values, or any other: pass the whole
model to ``svf.prepare`` when the optimizer holds only the heads), whether every trainable ``vector_S`` of that
module has a gradient and is in that optimizer's parameter groups, and otherwise warns once, in one line, with a
``SingularValuesNotTrainingWarning`` (filter it like any warning). The module is then no longer watched; with
nothing left to watch the hook returns at once (one Python call per step). Optimizers that hold nothing of a
registered module are remembered and skipped for it.

``svf.check_singular_values_train(model, optimizer)`` runs the same check on request (after ``backward()``,
before ``zero_grad()``) and raises with the same message.
"""
import warnings
import weakref

from torch.optim.optimizer import register_optimizer_step_pre_hook

from .layers import SVDLayer

__all__ = ["SingularValuesNotTrainingWarning", "check_singular_values_train", "watch"]

CAUSES = ("usual causes: the backbone runs under torch.no_grad() or its features are .detach()ed (remove both "
          "around the backbone: svf.freeze_batchnorm and the frozen weights already keep it frozen), or the "
          "optimizer's explicit parameter groups leave S out (add {'params': [p for n, p in model.named_parameters() "
          "if 'vector_S' in n and p.requires_grad]})")


class SingularValuesNotTrainingWarning(UserWarning):
    """Trainable singular values got no gradient, or are in no parameter group, at the first optimizer step."""


def _trainable_s(module):
    """``{layer name: vector_S}`` of the SVD layers of ``module`` whose singular values train."""
    return {name or "<root>": m.vector_S for name, m in module.named_modules()
            if isinstance(m, SVDLayer) and m.vector_S.requires_grad}


def _names(layers, limit=4):
    """``'layer2.0.conv1, layer2.0.conv2, … (per stage: layer2 8, layer3 12)'``: a few names, a count per stage."""
    stages = {}
    for name in layers:
        stage = name.split(".")[0]
        stages[stage] = stages.get(stage, 0) + 1
    shown = ", ".join(layers[:limit]) + (", …" if len(layers) > limit else "")
    return f"{shown} (per stage: " + ", ".join(f"{s} {n}" for s, n in stages.items()) + ")"


def _problems(layers, optimizer):
    """The problem lines for the trainable singular values ``layers`` ({name: vector_S}) and ``optimizer``."""
    lines = []
    no_grad = [n for n, p in layers.items() if p.grad is None]
    if no_grad:
        lines.append(f"{len(no_grad)} of {len(layers)} SVD layers whose singular values train got no gradient: "
                     + _names(no_grad))
    if optimizer is not None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in layers.items() if id(p) not in held]
        if missing:
            lines.append(f"{len(missing)} of {len(layers)} SVD layers have their trainable singular values in none "
                         f"of the optimizer's parameter groups: " + _names(missing))
    return lines


def _message(lines):
    return "svf: S does not train: " + "; ".join(lines) + f"; {CAUSES}"


def check_singular_values_train(model, optimizer=None):
    """Check that every trainable singular value of ``model`` has a gradient (call after ``loss.backward()``,
    before ``zero_grad()``) and, given ``optimizer``, is in one of its parameter groups. Returns a one-line
    summary; raises RuntimeError naming how many layers and which, with the usual causes, when one does not."""
    layers = _trainable_s(model)
    if not layers:
        raise RuntimeError(f"svf: {type(model).__name__} has no trainable singular values (vector_S); resolve it "
                           "with svf.resolver and freeze it with svf.apply_paper_freezing or svf.prepare")
    lines = _problems(layers, optimizer)
    if lines:
        raise RuntimeError(_message(lines))
    count = sum(p.numel() for p in layers.values())
    return (f"svf: the singular values of {len(layers)} SVD layers ({count:,d} values) train: all got a gradient"
            + (" and are in the optimizer" if optimizer is not None else ""))


class _Watch:
    """The registered modules (weak references) not yet checked, and the global step pre-hook."""

    def __init__(self):
        self.pending = []  # [(weakref to module, WeakSet of optimizers that concern it not)]
        self.handle = None

    def add(self, module):
        self.pending = [(ref, skip) for ref, skip in self.pending if ref() is not None and ref() is not module]
        self.pending.append((weakref.ref(module), weakref.WeakSet()))
        if self.handle is None:
            self.handle = register_optimizer_step_pre_hook(self.before_step)

    def before_step(self, optimizer, args, kwargs):
        if not self.pending:
            return  # everything checked: the hook costs one call (a hook cannot remove itself while hooks run)
        keep = []
        for ref, skip in self.pending:
            module = ref()
            if module is None:
                continue
            if optimizer in skip:
                keep.append((ref, skip))
                continue
            layers = _trainable_s(module)
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not any(id(p) in held for p in module.parameters()):  # another model's optimizer: wait
                skip.add(optimizer)
                keep.append((ref, skip))
                continue
            if not layers:
                lines = [f"none of the singular values of {type(module).__name__} trains any more (requires_grad=False "
                         "on every vector_S): something froze them after svf.prepare / apply_paper_freezing / "
                         "mark_only_singular_values_as_trainable (a freezing loop of the codebase's own?)"]
            else:
                lines = _problems(layers, optimizer)
            if lines:
                warnings.warn(_message(lines) + "; check with svf.check_singular_values_train(model, optimizer)",
                              SingularValuesNotTrainingWarning, stacklevel=3)
        self.pending = keep

    def remove(self):
        self.pending = []
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


_WATCH = _Watch()


def unwatch_all():
    """Forget every registered module and remove the global hook (call it outside an optimizer step)."""
    _WATCH.remove()


def watch(module):
    """Check at the first optimizer step that concerns ``module`` that its trainable singular values train
    (see the module docstring); called by the freezing verbs. Returns ``module``."""
    _WATCH.add(module)
    return module

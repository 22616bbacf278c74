"""Checks run before any heavy work, so that missing inputs fail in seconds with the command that
makes them: the data root, the image lists, and the stage-1 PSPNet checkpoint BAM needs."""
from __future__ import annotations

import errno
import os


def pretrained_is_stage1_checkpoint(cfg) -> bool:
    """Whether the backbone weights `pretrained` are the stage-1 PSPNet checkpoint `base_learner` (as in the
    demo, which starts few-shot training from the backbone stage 1 trained)."""
    return bool(cfg.pretrained and cfg.base_learner
                and os.path.abspath(cfg.pretrained) == os.path.abspath(cfg.base_learner))


def _make_lists_command(cfg) -> str:
    extra = ""
    if cfg.benchmark == "folder":
        extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("classes_file", cfg.classes_file),
                                                                    ("num_folds", cfg.num_folds)) if v is not None)
        if cfg.novel_classes:
            extra += " --novel-classes " + ",".join(cfg.novel_classes)
    return (f"python -m dataset.make_lists {cfg.benchmark} --data-root {cfg.data_root} --list-dir {cfg.list_dir} "
            f"--min-class-pixels {cfg.min_class_pixels}{extra}")


def check_data(cfg, config_path: str = "CONFIG"):
    """The data root and the train/val lists must exist, and the benchmark must resolve (its classes, the fold);
    the message says which command builds what is missing."""
    from dataset.registry import benchmark_of, family

    if not os.path.isdir(cfg.data_root):
        if "synthetic" in cfg.data_root:
            how = f"generate it with: python -m dataset.synthetic --out {cfg.data_root}  (or run sh demo.sh)"
        else:
            how = family(cfg.benchmark).data_hint.replace("DATA_ROOT", cfg.data_root)
        raise FileNotFoundError(f"data root '{cfg.data_root}' (config key data_root in {config_path}) not found; "
                                f"{how}; or point data_root=PATH at it. Then build the lists: "
                                f"{_make_lists_command(cfg)}")
    try:
        bench = benchmark_of(cfg)
        bench.novel_classes(cfg.fold)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"benchmark {cfg.benchmark} (config {config_path}): {exc}") from None
    for split in ("train", "val"):
        path = os.path.join(cfg.list_dir, split + ".txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"image list '{path}' (config key list_dir in {config_path}) not found; build it with: "
                f"{_make_lists_command(cfg)}")


def check_base_learner(cfg, config_path: str = "CONFIG"):
    """arch=bam needs the stage-1 PSPNet checkpoint; say how it is made when it is missing."""
    if cfg.arch != "bam":
        return
    if not cfg.base_learner:
        raise ValueError(f"arch=bam needs base_learner (the stage-1 PSPNet checkpoint path) in {config_path}")
    if not os.path.isfile(cfg.base_learner):
        raise FileNotFoundError(
            f"stage-1 PSPNet checkpoint '{cfg.base_learner}' (config key base_learner) not found; make it with: "
            f"python train.py --config {config_path} --stage1   (sh train.sh does this automatically "
            f"when it is missing), or point base_learner=PATH at an existing one")


def check_pretrained(cfg, config_path: str = "CONFIG"):
    """Backbone weights named by `pretrained` must exist; a stage-1 checkpoint says how it is made."""
    if not cfg.pretrained or os.path.isfile(cfg.pretrained):
        return
    if pretrained_is_stage1_checkpoint(cfg):
        raise FileNotFoundError(
            f"backbone weights '{cfg.pretrained}' (config key pretrained) are the stage-1 PSPNet checkpoint, which "
            f"is not there yet; make it with: python train.py --config {config_path} --stage1")
    if os.path.basename(cfg.pretrained).endswith("_synthcls.pth"):  # the demo's (tools/pretrain_demo_backbone.py)
        raise FileNotFoundError(
            f"backbone weights '{cfg.pretrained}' (config key pretrained in {config_path}) not found; the demo's "
            f"backbone ships with the repository as weights/{os.path.basename(cfg.pretrained)} (restore it with git "
            f"checkout -- weights/), or make it on synthetic classification with: python "
            f"tools/pretrain_demo_backbone.py --out {cfg.pretrained}")
    raise FileNotFoundError(
        f"backbone weights '{cfg.pretrained}' (config key pretrained in {config_path}) not found; ImageNet weights "
        f"cannot be downloaded here: put resnet50_v2.pth (PSPNet/PFENet's initmodel) or a torchvision state dict "
        f"at that path, or set pretrained=null for a random initialisation (tests and demos only)")


def value_origin(key: str, config_path: str, overrides) -> str:
    """Where a config value came from, for messages: 'the command line (key=value)' when an override set it (the
    last one wins), else 'config FILE'."""
    given = [o for o in overrides if o.split("=", 1)[0].strip() == key]
    return f"the command line ({given[-1]})" if given else f"config {config_path}"


PROBE_BYTES = 64 * 1024  # written (and fsynced) by check_writable: more than a results JSON, so a full disk shows


def check_writable(folder: str, what: str, origin: str = "CONFIG"):
    """The output folder (exp_dir, or test.py --out's folder) must accept a new file, or, when it does not exist
    yet, its nearest existing parent must be a writable folder: a read-only, unwritable or full place is one line
    before any training or evaluation, not a traceback after it. The nearest existing folder is probed with a
    temporary file of PROBE_BYTES real bytes, written with os.write and fsynced (an empty file is created even on
    a full disk), then removed at once: nothing is created or left behind. ``origin``: where the value came from
    (value_origin)."""
    import tempfile

    folder = os.path.abspath(folder or ".")
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder")
        if existing != folder and not os.access(existing, os.W_OK | os.X_OK):  # also reports a read-only file system
            raise PermissionError(errno.EACCES, f"cannot create folders in {existing}")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe.")
        try:
            data = b"\0" * PROBE_BYTES
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            from engine.checkpoint import write_error_reason
            raise OSError(f"{what} '{folder}' (from {origin}) cannot be written: {write_error_reason(existing, exc)}, "
                          "or choose a folder on another disk") from None
        reason = exc.strerror or str(exc)
        raise PermissionError(f"{what} '{folder}' (from {origin}) is not writable: {reason}; choose a writable "
                              f"folder (exp_dir=PATH / --out PATH) or fix its permissions") from None

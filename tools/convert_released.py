"""Convert a checkpoint of the released SVF / BAM / PFENet code into this project's checkpoint format.

    python tools/convert_released.py IN OUT --config config/pascal_split0.yaml [key=value ...]
    python tools/convert_released.py train_epoch_107_0.6897.pth bam_svf.pth --config config/pascal_split0.yaml arch=bam

The config (with its overrides) describes the model: arch, backbone, svf, shot, dilation_rule, num_base_classes
must be those of the released run (the format is recognised from the keys; a mismatch is an error that says
which key to set). OUT is ``{"model": state_dict, "format", "source", "epoch"}``: ``model.build_model(cfg)``
then ``load_state_dict(ckpt["model"], strict=True)`` accepts it, and ``test.py --weights OUT`` evaluates it
(``test.py --weights IN`` converts the same way in memory). See model/released.py for the formats.
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("src", metavar="IN", help="released checkpoint (.pth)")
    parser.add_argument("dst", metavar="OUT", help="converted checkpoint to write")
    parser.add_argument("--config", required=True, help="config describing the model, e.g. config/pascal_split0.yaml")
    args, rest = parser.parse_known_args(argv)

    import model as models
    from engine.checkpoint import atomic_save, load_checkpoint
    from engine.config import load_config, split_overrides
    from model.released import load_released

    cfg = load_config(args.config, split_overrides(rest))
    with warnings.catch_warnings():  # every weight comes from the file
        warnings.simplefilter("ignore", models.RandomInitWarning)
        net = models.build_model(cfg.replace(pretrained=None, base_learner=None))
    obj = load_checkpoint(args.src)
    fmt, report = load_released(net, obj, args.src)
    for line in report:
        print(line)
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    atomic_save({"model": net.state_dict(), "format": fmt, "source": os.path.abspath(args.src),
                 "epoch": epoch if isinstance(epoch, (int, float)) else None}, args.dst)
    print(f"wrote {args.dst} (arch={cfg.arch} backbone={cfg.backbone} svf={cfg.svf} shot={cfg.shot})")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")

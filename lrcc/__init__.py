"""lrcc: the low-rank conv converter (LoRA and DnA-style low-rank + sparse fine-tuning), torch only.

Copy this folder into any project (it imports nothing but torch and the standard library; it does not
need svf). The verbs:

    import lrcc
    model = lrcc.model_convert_conv(model, mode="tune_U_S", cache_path="resnet18_dna.pt",
                                    ignore_op_name=["downsample"])
    lrcc.mark_only_lrcc_as_trainable(model)           # optional: the adapter alone trains
    lrcc.print_trainable_parameters(model)
    lrcc.save_adapter(model, "adapter.pt")            # all but the base weights + options + base fingerprint
    model = lrcc.load_adapter(pretrained, "adapter.pt", merge=False)   # no options to repeat
    plain = lrcc.merge(model)                         # plain nn.Conv2d layers, same outputs
    vit = lrcc.model_convert_conv(vit, mode="lora_mode", r=8, include_linear=True)   # nn.Linear layers too

The math is in ``lrcc/convert.py``; the adapter file in ``lrcc/adapter.py``.
"""
from .adapter import (load_adapter, load_lora_state_dict, load_state_dict, save_adapter, save_lora_state_dict,
                      state_dict)
from .common import count_parameters, print_trainable_parameters, weight_fingerprint
from .convert import (LOW_RANK_LAYERS, MODES, TRAINABLE_BY_MODE, LowRankConv2d, LowRankLinear,
                      decompose_low_rank_sparse, layer_rank, mark_only_lrcc_as_trainable, merge, model_convert_conv)

__all__ = ["MODES", "TRAINABLE_BY_MODE", "LowRankConv2d", "LowRankLinear", "LOW_RANK_LAYERS", "model_convert_conv",
           "decompose_low_rank_sparse", "layer_rank", "mark_only_lrcc_as_trainable", "merge", "state_dict", "load_state_dict", "save_adapter",
           "load_adapter", "save_lora_state_dict", "load_lora_state_dict", "weight_fingerprint",
           "count_parameters", "print_trainable_parameters"]

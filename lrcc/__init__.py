"""lrcc: the low-rank conv converter (LoRA and DnA modes) under its seed's import name.

A thin alias: the code lives in ``svf/lrcc.py`` so that copying the ``svf`` folder carries it.
``import lrcc; model = lrcc.model_convert_conv(model, mode="lora_mode", ignore_op_name=["downsample"])``.
"""
from svf.lrcc import (MODES, TRAINABLE_BY_MODE, LowRankConv2d, count_parameters, decompose_low_rank_sparse,
                      layer_rank, load_lora_state_dict, mark_only_lrcc_as_trainable, merge, model_convert_conv,
                      print_trainable_parameters, save_lora_state_dict)

__all__ = ["MODES", "TRAINABLE_BY_MODE", "LowRankConv2d", "model_convert_conv", "decompose_low_rank_sparse",
           "layer_rank", "mark_only_lrcc_as_trainable", "merge", "save_lora_state_dict",
           "load_lora_state_dict", "count_parameters", "print_trainable_parameters"]

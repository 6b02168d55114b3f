"""Mixtral (8x7B): plain GQA attention, optional sliding window, top-2 routing always renormalised.

Its original checkpoints name the MoE block `block_sparse_moe` and the expert projections w1 (gate), w3 (up) and
w2 (down); those keys are renamed to the common layout before loading.
"""

from model.models.decoder import MoeCausalLM


class MixtralForCausalLM(MoeCausalLM):
    model_type = "mixtral"
    checkpoint_renames = (
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
        (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
        (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    )

"""Building blocks of the MoE transformer: norm, rotary, linear, paged attention, gated MLP, sparse MoE block."""

"""Process groups (TP, DP, EP, expert-TP/DP), logical-key amax reduction, megatron-core adapters and CPU shims."""

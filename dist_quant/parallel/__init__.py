"""Process groups (TP, DP, EP, expert-TP/DP) and their reduction domains, logical-key amax reduction, sharding
helpers, megatron-core adapters and CPU shims, and a local process-group launcher."""

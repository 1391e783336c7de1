"""ERO_EGGROLL: evolve Qwen2.5-VL on ARC-1 with EGGROLL low-rank evolution strategies."""

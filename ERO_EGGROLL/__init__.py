"""ERO_EGGROLL: evolve Qwen2.5-VL on ARC-1 with EGGROLL low-rank evolution strategies.

Importing the package first makes JAX allocate GPU memory on demand: by default JAX grabs 75% of
the GPU when it starts, and torch, which holds the model on the same GPU, then runs out of memory.
Every entry point imports this package before JAX; a user's own setting of the variable wins.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

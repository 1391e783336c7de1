"""ARC-1 tasks, their rendering and prompts, and the fitness metrics (ERO's character similarity and lenient ones)."""

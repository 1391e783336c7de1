"""A run: the one epoch step, replay, resume, the epoch loop, the population and its Ray workers, signals, loggers."""

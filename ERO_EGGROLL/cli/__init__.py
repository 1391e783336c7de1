"""The command-line entry points: training, replay, the doctor, the evaluator table."""

"""What a run leaves on disk: checkpoints and run state, identity, metrics and plots, run folders, model cards."""

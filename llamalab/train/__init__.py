"""Training: optimizer and schedule, the one train step, checkpoints, stability guards, pretraining."""

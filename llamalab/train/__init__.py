"""Training: set-up (setup.py), optimizer and schedule, the one train step (step.py), the loop
(trainer.py), checkpoints, stability guards, the run record (meta.py), parallelism."""

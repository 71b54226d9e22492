"""Preference tuning (Llama 2, Touvron et al. 2023b, sections 3.2-3.4): preference data, DPO, reward models,
rejection sampling and PPO, all trained through :class:`llamalab.train.trainer.Trainer`."""

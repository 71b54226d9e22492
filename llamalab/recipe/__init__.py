"""Recipes: chains of stages run as one resumable command (chat.py: base model -> SFT -> RM -> DPO -> PPO ->
evaluation at every step -> release)."""

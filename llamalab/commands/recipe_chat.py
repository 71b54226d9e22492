"""The post-training chain as one resumable command: ``llamalab recipe chat --base MODEL --out DIR``.

Base model -> LoRA SFT (Alpaca, then a ShareGPT sample) -> reward model (from the SFT model, HH-RLHF pairs) ->
DPO (from the SFT model) -> a short PPO round (from the DPO model, against the reward model) -> the same
evaluation at the start and after every policy step (MC benchmarks ± standard error on a seeded sample of
``--eval.limit`` items, the reward model's held-out accuracy, the mean RM score of the policy's greedy answers to
held-out prompts, the pairwise judge vs the start in both orders) -> the release bundle of the last run.

Each step is its own run folder under ``--out`` (``sft/1-alpaca``, ``sft/2-sharegpt``, ``rm``, ``dpo``, ``ppo``,
``start``, ``release``); rerunning skips what finished, and ``--resume`` continues a half-done step.
``recipe.json`` records every step's folder, wall time and figures; ``report.html`` sets them side by side. Step
sizes: ``--sft.limit N --sft.steps S --sft.lr X`` (likewise ``--rm.*``, ``--dpo.*``, ``--ppo.*``; PPO's steps are
iterations), and ``--dpo.overrides '{"beta": 0.05}'`` for any other field of a stage. See docs/recipe.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llamalab.commands import dpo, judge, ppo, release, rm, sft
from llamalab.commands.eval import run as eval_run
from llamalab.common import LlamalabError
from llamalab.recipe.chat import (
    DEFAULT_PREFERENCE,
    DEFAULT_QUESTIONS,
    DEFAULT_SFT,
    EvalKnobs,
    PPOKnobs,
    Stages,
    StepKnobs,
    run_chat_recipe,
)


@dataclass
class Config:
    base: str = field(default="", metadata={"help": "the starting model: a llamalab model or run folder, a Hugging "
                                                   "Face folder or a .gguf file"})
    out: str = field(default="runs/recipe-chat", metadata={"help": "the recipe folder (one run folder per step)"})
    sft_data: list[str] = field(default_factory=lambda: list(DEFAULT_SFT), metadata={
        "help": "SFT files, trained in order (Alpaca or ShareGPT, told apart by their first record)"})
    preference_data: list[str] = field(default_factory=lambda: list(DEFAULT_PREFERENCE), metadata={
        "help": "preference pairs for the RM and DPO (PPO: their training prompts)"})
    questions: str = field(default=DEFAULT_QUESTIONS, metadata={"help": "the judge's questions (Vicuna-80 JSONL)"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "preference prompts held out (seeded hash)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank of every training step (0: full fine-tuning)"})
    sft: StepKnobs = field(default_factory=StepKnobs)
    rm: StepKnobs = field(default_factory=StepKnobs)
    dpo: StepKnobs = field(default_factory=StepKnobs)
    ppo: PPOKnobs = field(default_factory=PPOKnobs)
    eval: EvalKnobs = field(default_factory=EvalKnobs)
    release: bool = field(default=True, metadata={"help": "write the release bundle of the last step"})
    release_gguf: bool = field(default=True, metadata={"help": "the bundle also holds model.gguf"})
    resume: bool = field(default=False, metadata={"help": "continue a half-done step from its last checkpoint"})
    device: str = "auto"
    seed: int = 1337

    def validate(self) -> None:
        if not self.base:
            raise LlamalabError("recipe chat: give the starting model, --base MODEL")
        if not self.sft_data or not self.preference_data:
            raise LlamalabError("recipe chat: --sft-data and --preference-data need at least one file each")
        if not 0 < self.heldout_fraction < 1:
            raise LlamalabError(f"recipe chat: --heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        for name in ("sft", "rm", "dpo", "ppo"):
            getattr(self, name).validate(name)
        self.eval.validate()


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    return run_chat_recipe(cfg, Stages(sft=(sft.Config, sft.main), rm=(rm.Config, rm.main),
                                       dpo=(dpo.Config, dpo.main), ppo=(ppo.Config, ppo.main),
                                       eval_run=(eval_run.Config, eval_run.main), judge=(judge.Config, judge.main),
                                       release=(release.Config, release.main)))


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)

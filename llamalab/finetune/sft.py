"""``python -m llamalab.finetune.sft`` (and ``torchrun -m llamalab.finetune.sft``): the documented
launch path of ``llamalab sft``, kept as an alias of :mod:`llamalab.commands.sft`."""

from llamalab.commands.sft import Config, main  # noqa: F401

if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)

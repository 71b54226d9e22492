"""``python -m llamalab.train.pretrain`` (and ``torchrun -m llamalab.train.pretrain``): the documented
launch path of ``llamalab pretrain``, kept as an alias of :mod:`llamalab.commands.pretrain`."""

from llamalab.commands.pretrain import Config, main  # noqa: F401

if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)

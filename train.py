"""`python train.py ...` is `dq-train ...`: the training job of dq.jobs.train (its docstring lists the command
lines and the outputs). This file stays so that a checkout runs without installing the package; DDP re-launches
it by its path."""

from dq.jobs.train import cli

if __name__ == "__main__":
    cli()

"""`python evaluate.py ...` is `dq-evaluate ...`: the evaluation job of dq.jobs.evaluate (its docstring lists
the command lines and the outputs). This file stays so that a checkout runs without installing the package; DDP
re-launches it by its path."""

from dq.jobs.evaluate import cli

if __name__ == "__main__":
    cli()

"""The Hydra jobs behind the commands: dq.jobs.train (dq-train, python train.py) and dq.jobs.evaluate
(dq-evaluate, python evaluate.py). Each module's train() / evaluate() is a plain function of a config; main()
is the @hydra.main shell, cli() adds dq's one-line errors."""

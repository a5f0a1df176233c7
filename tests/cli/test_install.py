"""`pip install .` gives working commands outside the checkout: the package is built from a copy of
pyproject.toml and dq/ alone (nothing else of the checkout can leak in), installed into a fresh venv, and its
dq-train, dq-evaluate, dq-export and dq-sweep (and `python -m dq.evaluation.sweep`) run from another directory on
a tiny model: the Hydra configs come from the installed package. The fresh venv sees the test environment's
third-party packages through a .pth file (no download, no second install of torch); the build uses this
environment's setuptools without isolation, so the test runs offline.

The SLURM launcher config (hydra/launcher=slurm) composes and every key it sets is one submitit's SLURM executor
takes, rendered into the sbatch script."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("dq-train", "dq-evaluate", "dq-export", "dq-sweep")


def _run(args, cwd, env, timeout=300):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the dq wheel built from pyproject.toml + dq/ installed into it; its bin dir."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (requirements-dev)")
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copy2(REPO / "README.md", src)
    shutil.copytree(REPO / "dq", src / "dq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
          str(src)], root, env)
    wheel = next((root / "dist").glob("dq-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], root, env)  # pip from ensurepip: offline
    purelib = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        root, env).strip())
    # this environment's third-party packages (torch, diffusers, ...), seen after the venv's own
    deps = {sysconfig.get_path("purelib"), *site.getsitepackages()} - {str(purelib)}
    (purelib / "zz_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], root, env)
    return venv / "bin"


def test_the_wheel_ships_the_configs_and_the_commands(installed):
    for name in COMMANDS:
        assert (installed / name).is_file(), name
    probe = ("import dq, dq.cli, json; print(json.dumps([dq.__file__, str(dq.cli.CONF_DIR), "
             "sorted(p.name for p in dq.cli.CONF_DIR.iterdir())]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    module, conf, groups = json.loads(_run([str(installed / "python"), "-c", probe], installed, env))
    assert not module.startswith(str(REPO)), module  # the installed copy, not the checkout's
    assert Path(conf, "config.yaml").is_file() and Path(conf, "hydra", "launcher", "slurm.yaml").is_file()
    assert {"model", "quant", "method", "trainer", "logger", "eval", "experiment", "hydra"} <= set(groups)


@pytest.mark.slow
def test_installed_commands_run_from_another_directory(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "DQ_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / "run"
    # the embedded model: its weights come from the installed package too
    _run([str(installed / "dq-train"), "model=embedded", "model.sampler.num_steps=4", "progress_bar=false", "data.num_samples=32", "data.num_trajectories=8",
          "data.progress=false", "method=ptq_minmax", "fidelity.num_samples=4", "fidelity.batch_size=4",
          f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"], work, env)
    assert json.loads((run / "results.json").read_text())["complete"]
    _run([str(installed / "dq-evaluate"), f"run={run}", "eval.num_samples=4", "eval.batch_size=4", "eval.is_splits=1",
          "eval.grid_rows=1", "progress_bar=false", f"hydra.run.dir={tmp_path / 'eval'}"], work, env)
    assert "fid" in json.loads((run / "metrics.json").read_text())
    out = _run([str(installed / "dq-export"), f"run={run}", "verify=2", "device=cpu"], work, env)
    assert "dq: exported" in out and (run / "student_int.safetensors").is_file()
    report = _run([str(installed / "dq-sweep"), str(tmp_path), "--fidelity"], work, env)
    assert "ptq_minmax" in report
    usage = _run([str(installed / "python"), "-m", "dq.evaluation.sweep", "--help"], work, env)
    assert "--seeded" in usage
    assert sorted(work.iterdir()) == []  # every output went where it was told: nothing in the working dir


def test_the_slurm_launcher_config_renders_an_sbatch_script(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from dq.cli import CONF_DIR

    fake = tmp_path / "bin"  # submitit's SLURM executor looks for srun; nothing is submitted
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=a100", "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.job.name=train"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher.pop("_target_").endswith("submitit_launcher.SlurmLauncher")
    # as the launcher builds its executor (hydra_submitit_launcher's launch): the init keys, then the base queue
    # keys as they are and the others prefixed with slurm_; an unknown key raises in update_parameters
    executor = submitit.AutoExecutor(cluster="slurm", folder=launcher.pop("submitit_folder"),
                                     slurm_max_num_timeout=launcher.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()})
    text = executor._executor._make_submission_file_text("python train.py", "1")
    for line in ("#SBATCH --partition=a100", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=240", "#SBATCH --mem=64GB", "#SBATCH --signal=USR2@120",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --job-name=train"):
        assert line in text, line

"""dq.tracking: one W&B run per job, read back from the offline run files (no login, no network): a 2-job `-m`
sweep gives two runs, each with its own name, config and summary; a PTQ method (no Trainer) is logged too; a
failing job finishes its run with exit code 1; the run names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from omegaconf import OmegaConf

from dq.jobs import train as train_job
from dq.tracking import final_figures, model_label, run_name
from tests.conftest import write_model_folder
from tests.quant.conftest import tiny_unet2d
from tests.train.conftest import compose_config, fast_overrides

REPO = Path(__file__).resolve().parents[1]
BLOCK = 32768  # the W&B transaction log: LevelDB's log format, 32 KiB blocks of (crc32, length, type) records


def wandb_records(path: Path):
    """The protobuf records of an offline run's run-<id>.wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, payload = 7, b""  # the header: ":W&B", a 2-byte magic, a version byte
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7 or data[pos + 6] == 0:  # a block's zero-filled tail
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def read_offline_run(run_dir: Path) -> dict:
    """Name, group, tags, job type, config, final summary and exit code of the one offline run in run_dir (in
    process, after wandb.teardown(): W&B's service writes a finished run's last records when it stops)."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run: dict = {"summary": {}, "config": {}, "exit_code": None, "dir": files[0].parent}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group,
                       tags=list(record.run.tags), job_type=record.run.job_type)
            run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            run["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                   for u in record.summary.update})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_model_folder(tiny_unet2d(), tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """WANDB_MODE=offline with W&B's own files (settings, cache) under tmp_path; the variables, for a subprocess."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_a_two_job_sweep_writes_one_offline_run_per_job(tiny_model_dir, tmp_path, wandb_offline):
    sweep = tmp_path / "sweep"
    overrides = [o for o in fast_overrides(tiny_model_dir, Path("unused"), tmp_path / "cache")
                 if not o.startswith("output_dir=")]
    env = {**os.environ, **wandb_offline, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "seed=0,1", "logger=wandb",
                           "logger.tags=[ci]", f"hydra.sweep.dir={sweep}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_dirs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(job_dirs) == 2
    runs = [read_offline_run(job) for job in job_dirs]
    assert runs[0]["id"] != runs[1]["id"]
    for seed, (job, run) in enumerate(zip(job_dirs, runs)):
        results = json.loads((job / "results.json").read_text())
        assert run["name"] == f"{tiny_model_dir.name}_dilatequant_w4a4_s{seed}"
        assert run["group"] == "/".join(sweep.parts[-2:])
        assert run["tags"] == ["ci"] and run["job_type"] == "train"
        # the job's own resolved config, not the first job's
        assert run["config"]["seed"] == seed and run["config"]["output_dir"] == str(job)
        assert run["config"]["method"]["distill"]["iters_per_block"] == 2
        # the final figures and times, the per-block losses logged during training, the sample grid
        for key in ("psnr_vs_fp", "mse_vs_fp", "ssim_vs_fp", "train_seconds", "wall_seconds"):
            assert run["summary"][key] == pytest.approx(results[key]), key
        assert "bkd/final_loss" in run["summary"]
        assert run["summary"]["samples/_type"] == "images/separated"
        assert list(run["dir"].glob("files/media/images/samples_*.png"))
        assert run["exit_code"] == 0


def test_a_ptq_method_is_logged_without_a_trainer(tiny_model_dir, tmp_path, wandb_offline):
    out = tmp_path / "run"
    cfg = compose_config([*fast_overrides(tiny_model_dir, out, tmp_path / "cache", iters=None),
                          "method=ptq_minmax", "logger=wandb", "logger.name=mine", "logger.group=g"])
    results = train_job.train(cfg)
    wandb.teardown()
    run = read_offline_run(out)
    assert (run["name"], run["group"], run["exit_code"]) == ("mine", "g", 0)
    assert run["config"]["method"]["name"] == "ptq_minmax"
    assert run["summary"]["psnr_vs_fp"] == pytest.approx(results["psnr_vs_fp"])
    assert run["summary"]["samples/_type"] == "images/separated"


def test_a_failing_job_finishes_its_run_as_failed(tiny_model_dir, tmp_path, wandb_offline, monkeypatch):
    def broken(job):
        raise RuntimeError("fidelity check broke")

    monkeypatch.setattr(train_job, "write_outputs", broken)
    out = tmp_path / "run"
    cfg = compose_config([*fast_overrides(tiny_model_dir, out, tmp_path / "cache", iters=None),
                          "method=ptq_minmax", "logger=wandb"])
    with pytest.raises(RuntimeError, match="fidelity check broke"):
        train_job.train(cfg)
    assert wandb.run is None  # the next job of a sweep starts its own run
    wandb.teardown()
    assert read_offline_run(out)["exit_code"] == 1


def test_run_names_say_model_method_bits_and_seed():
    def cfg(model, seed=3):
        return OmegaConf.create({"model": model, "method": {"name": "no_wd"}, "quant": {"name": "w6a6"}, "seed": seed})

    assert run_name(cfg({"source": "embedded", "embedded": None})) == "embedded_no_wd_w6a6_s3"
    assert run_name(cfg({"source": "embedded", "embedded": "dit"})) == "embedded_dit_no_wd_w6a6_s3"
    assert run_name(cfg({"source": "hub", "repo_id": "google/ddpm-cifar10-32"})) == "ddpm-cifar10-32_no_wd_w6a6_s3"
    assert run_name(cfg({"source": "local", "path": "/models/ldm_church"})) == "ldm_church_no_wd_w6a6_s3"
    evaluation = OmegaConf.create({"model": {"source": "embedded"}, "method": {"name": "fp"},
                                   "quant": {"name": "fp32"}, "eval": {"seed": 7}})
    assert run_name(evaluation) == "embedded_fp_fp32_s7"
    assert model_label({"source": "local", "path": None}) == "local"


def test_final_figures_keep_numbers_and_flatten_one_level():
    results = {"complete": True, "method": "dilatequant", "psnr_vs_fp": 30.5, "weight_bits": 4,
               "prep_seconds": {"cache": 1.5, "note": "x"}, "fidelity_protocol": {"kid": {"nested": 1}}}
    assert final_figures(results) == {"psnr_vs_fp": 30.5, "weight_bits": 4, "prep_seconds/cache": 1.5}

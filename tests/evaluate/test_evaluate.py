"""evaluate(cfg) end to end on a tiny 16x16 model: outputs and protocol, students, resuming, DDP, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dq.jobs.evaluate import evaluate
from dq.metrics.backends import BackendUnavailable
from tests.evaluate.conftest import compose_eval, eval_overrides

REPO = Path(__file__).resolve().parents[2]
PROTOCOL_KEYS = ("backend", "feature_network", "feature_network_sha256", "num_samples", "reference", "sampler",
                 "steps", "eta", "guidance_scale", "seed", "code_version", "model", "images")


def test_fp_model_writes_metrics_with_the_full_protocol(model16_dir, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(compose_eval(eval_overrides(model16_dir, out, tmp_path / "cache")))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("fid", "sfid", "is", "psnr_vs_fp"):
        assert key in saved, key
    assert saved["fid"] > 0 and 1.0 <= saved["is"] <= 10.0
    assert saved["psnr_vs_fp"] is None and saved["model_kind"] == "fp" and saved["method"] == "fp"
    protocol = saved["protocol"]
    for key in PROTOCOL_KEYS:
        assert key in protocol, key
    assert protocol["guidance_scale"] is None and protocol["sampler"] == "ddim" and protocol["backend"] == "digits"
    assert protocol["num_samples"] == 12 and protocol["steps"] == 4 and protocol["eta"] == 0.0
    assert protocol["reference"]["count"] == 1797 and len(protocol["reference"]["sha256"]) == 64
    assert len(protocol["feature_network_sha256"]) == 64 and "dq" in protocol["code_version"]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"{k:06d}.png" for k in range(12)]
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (12, 16, 16, 1) and npz["arr_0"].dtype == np.uint8
    assert (out / "grid.png").is_file() and (out / "logs").is_dir()


def test_student_run_dir_gets_fidelity_and_a_copy_of_the_metrics(model16_dir, student_run_dir, tmp_path):
    cache = tmp_path / "cache"
    overrides = [*eval_overrides(model16_dir, tmp_path / "eval", cache), f"run={student_run_dir}"]
    results = evaluate(compose_eval(overrides))
    assert results["model_kind"] == "student" and results["method"] == "dilatequant" and results["weight_bits"] == 8
    assert 15.0 < results["psnr_vs_fp"] < 80.0 and 0.0 < results["mse_vs_fp"] < 0.05
    assert 0.5 < results["ssim_vs_fp"] <= 1.0
    assert results["protocol"]["student"]["quant_config"]["weight_bits"] == 8
    # per phase its device (trainer=auto without CUDA: the CPU), wall time and peak memory
    assert list(results["phases"]) == ["sampling", "fp_sampling", "metrics"] and results["device"] == "cpu"
    assert all(p["device"] == "cpu" and p["seconds"] >= 0 and p["peak_memory_mb"] > 0 for p in results["phases"].values())
    assert json.loads((student_run_dir / "metrics.json").read_text()) == json.loads(json.dumps(results))
    # the FP samples are cached for the next student of the same model: a second run samples none of them
    assert len(list(cache.glob("*/*.png"))) == 12
    again = evaluate(compose_eval([*eval_overrides(model16_dir, tmp_path / "eval2", cache), f"run={student_run_dir}"]))
    assert again["psnr_vs_fp"] == results["psnr_vs_fp"]


def test_student_off_its_schedule_follows_the_tpq_policy(model16_dir, student_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(student_run_dir, run)
    base = [*eval_overrides(model16_dir, tmp_path / "eval", tmp_path / "cache"), f"run={run}", "sampler.num_steps=6",
            "eval.metrics=[fidelity]"]
    with pytest.raises(ValueError, match="not in the schedule this student's TPQ tables were trained for"):
        evaluate(compose_eval(base))
    assert not (tmp_path / "eval" / "samples").exists()  # refused before any sampling
    results = evaluate(compose_eval([*base, "tpq_policy=nearest"]))
    protocol = results["protocol"]
    assert protocol["steps"] == 6 and protocol["remap"]["tpq_policy"] == "nearest"
    assert len(protocol["remap"]["trained_timesteps"]) == 4 and len(protocol["remap"]["sampled_timesteps"]) == 6
    assert 10.0 < results["psnr_vs_fp"] < 80.0


def test_resume_skips_written_samples_and_remakes_lost_ones(model16_dir, tmp_path):
    out = tmp_path / "eval"
    first = evaluate(compose_eval(eval_overrides(model16_dir, out, tmp_path / "cache")))
    before = {p.name: p.read_bytes() for p in (out / "samples").glob("*.png")}
    (out / "samples" / "000003.png").unlink()
    (out / "samples" / "000010.png").unlink()
    kept = (out / "samples" / "000000.png").stat().st_mtime_ns
    second = evaluate(compose_eval(eval_overrides(model16_dir, out, tmp_path / "cache")))
    assert (out / "samples" / "000000.png").stat().st_mtime_ns == kept
    assert {p.name: p.read_bytes() for p in (out / "samples").glob("*.png")} == before
    assert second["fid"] == first["fid"]


def test_resuming_with_another_seed_is_refused(model16_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate(compose_eval([*eval_overrides(model16_dir, out, tmp_path / "cache", num_samples=4), "eval.is_splits=1"]))
    overrides = [*eval_overrides(model16_dir, out, tmp_path / "cache", num_samples=4), "eval.is_splits=1", "eval.seed=1"]
    with pytest.raises(ValueError, match=r"holds samples of another setting \(differing: \['seed'\]\)"):
        evaluate(compose_eval(overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.metrics=[fid,kid]", r"unknown metric\(s\) \['kid'\]"),
        ("eval.backend=pytorch-fid", "eval.backend must be one of"),
        ("eval.num_samples=1", "eval.num_samples must be >= 2"),
        ("eval.metrics=[clip_score]", "set eval.clip_model"),
        ("eval.is_splits=50", r"eval.is_splits must lie in \[1, eval.num_samples=12\]"),
        ("eval.reference=/nowhere/stats.safetensors", "reference statistics file /nowhere/stats.safetensors not found"),
    ],
)
def test_bad_settings_fail_before_sampling(model16_dir, tmp_path, override, message):
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=message):
        evaluate(compose_eval([*eval_overrides(model16_dir, out, tmp_path / "cache"), override]))
    assert not (out / "samples").exists()


def test_missing_inception_weights_fail_before_sampling(model16_dir, tmp_path):
    out = tmp_path / "eval"
    overrides = [*eval_overrides(model16_dir, out, tmp_path / "cache"), "eval=inception", "eval.reference=digits",
                 f"eval.inception_path={tmp_path / 'inception.pt'}"]
    with pytest.raises(BackendUnavailable, match="inception.pt not found"):
        evaluate(compose_eval(overrides))
    assert not (out / "samples").exists()


def test_not_a_run_dir_is_named(model16_dir, tmp_path):
    with pytest.raises(ValueError, match="not a train.py output dir: config.yaml is missing"):
        evaluate(compose_eval([*eval_overrides(model16_dir, tmp_path / "eval", tmp_path / "c"), f"run={tmp_path}"]))


def _run_evaluate(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_two_ranks_make_the_same_samples_as_one(model16_dir, tmp_path):
    """Per-index seeding: 2 gloo processes each sample half of the indices, and the images equal one
    process's bit for bit at the same number of threads per process (a different thread count changes
    float reduction order). Both run as subprocesses with one thread (the script re-launches per rank)."""
    common = [o for o in eval_overrides(model16_dir, tmp_path, tmp_path / "cache") if not o.startswith("output_dir=")]
    one = _run_evaluate([*common, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = _run_evaluate([*common, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                         f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "dq: fp fp32: fid" in ddp.stdout
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"])
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two_metrics["protocol"]["world_size"] == 2 and two_metrics["fid"] == one_metrics["fid"]



class RecordingLogger:
    """A stand-in Lightning logger that keeps what evaluate() hands it."""

    calls: list = []

    def __init__(self, save_dir):
        self.save_dir = save_dir

    def log_hyperparams(self, params):
        RecordingLogger.calls.append(("hparams", params))

    def log_metrics(self, metrics, step):
        RecordingLogger.calls.append(("metrics", metrics))

    def log_image(self, key, images):
        RecordingLogger.calls.append(("image", key, images))

    def finalize(self, status):
        RecordingLogger.calls.append(("finalize", status))

    @property
    def experiment(self):
        return self

    def finish(self):
        RecordingLogger.calls.append(("finish",))


def test_the_logger_gets_the_figures_the_protocol_and_the_grid(model16_dir, tmp_path):
    RecordingLogger.calls = []
    out = tmp_path / "eval"
    results = evaluate(compose_eval([*eval_overrides(model16_dir, out, tmp_path / "cache", num_samples=4),
                                     "eval.is_splits=1", "~logger", f"+logger._target_={__name__}.RecordingLogger",
                                     f"+logger.save_dir={out}"]))
    calls = {call[0]: call[1:] for call in RecordingLogger.calls}
    assert calls["hparams"][0]["protocol"]["backend"] == "digits"
    assert calls["metrics"][0]["eval/fid"] == pytest.approx(results["fid"], rel=1e-5)
    assert calls["image"] == ("eval/samples", [str(out / "grid.png")])
    assert calls["finalize"] == ("success",)


def test_wandb_offline_run_gets_the_grid(model16_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "eval"
    evaluate(compose_eval([*eval_overrides(model16_dir, out, tmp_path / "cache", num_samples=4), "eval.is_splits=1",
                           "logger=wandb"]))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("files/media/images/eval/samples_*.png"))


@pytest.mark.parametrize(("name", "backend", "num_samples"),
                         [("default", "digits", 1000), ("inception", "inception", 1000),
                          ("cleanfid", "cleanfid", 1000), ("cifar10_paper", "cleanfid", 50000)])
def test_eval_configs_compose(name, backend, num_samples):
    cfg = compose_eval([f"eval={name}", "output_dir=unused"])
    assert (cfg.eval.backend, cfg.eval.num_samples) == (backend, num_samples)
    assert cfg.model.source == "embedded" and cfg.run is None and cfg.method.name == "fp"
    if name == "cifar10_paper":
        assert cfg.eval.reference == "cleanfid:cifar10/32/train"


def test_model_conditioning_gives_class_k_mod_num_classes_and_records_prompt_files(tmp_path):
    from safetensors.torch import save_file

    from dq.zoo import ModelComponents, model_conditioning

    none = model_conditioning({"conditioning": None}, ModelComponents())
    assert not none.is_conditional and none.for_indices(torch.arange(3)) == (None, None) and none.record() == {}
    classes = model_conditioning({"conditioning": {"num_classes": 10, "uncond_class": 10}}, ModelComponents())
    cond, uncond = classes.for_indices(torch.tensor([3, 12, 25]))
    assert cond.tolist() == [3, 2, 5] and uncond.tolist() == [10, 10, 10] and classes.record()["num_classes"] == 10
    save_file({"prompt_embeds": torch.randn(5, 3, 4)}, tmp_path / "p.safetensors")
    text = model_conditioning({"conditioning": {"prompt_embeds_file": str(tmp_path / "p.safetensors")}},
                              ModelComponents(), limit=2)
    assert text.for_indices(torch.tensor([0, 1, 2]))[0].shape == (3, 3, 4)
    record = text.record()["prompt_embeds"]
    assert record["num_prompts"] == 2 and len(record["sha256"]) == 64
    with pytest.raises(ValueError, match="uncond_class is set but num_classes is not"):
        model_conditioning({"conditioning": {"uncond_class": 10}}, ModelComponents())
    with pytest.raises(ValueError, match="num_classes and prompt_embeds_file"):
        model_conditioning({"conditioning": {"num_classes": 3, "prompt_embeds_file": "x"}}, ModelComponents())
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        model_conditioning({"conditioning": {"prompt_embeds_file": str(tmp_path / "bad.safetensors")}}, ModelComponents())

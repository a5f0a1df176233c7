"""python -m dq.export on a run dir, evaluate.py on its export, and the command's errors."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from dq.arch import describe
from dq.export import read_export
from dq.export.__main__ import main
from dq.jobs.evaluate import evaluate
from dq.quant import QuantConfig, calibrate_activations, quantize_model, save_quant_state
from dq.sampling import SamplerConfig, sample
from tests.conftest import write_model_folder
from tests.evaluate.conftest import STEPS, compose_eval, eval_overrides, make_unet16


@pytest.fixture(scope="module")
def model_and_run(tmp_path_factory):
    """A tiny 16x16 model folder and a complete W4A4 run dir made from it (what train.py leaves behind)."""
    model_dir = write_model_folder(make_unet16(), tmp_path_factory.mktemp("model16"))
    run = tmp_path_factory.mktemp("run")
    sampler = SamplerConfig(name="ddim", num_steps=STEPS)
    unet = make_unet16()
    student = quantize_model(unet, QuantConfig(weight_bits=4, act_bits=4, num_steps=STEPS, num_groups=STEPS),
                             describe(unet))
    scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    with calibrate_activations(student):
        sample(student, scheduler_config, sampler, 4, batch_size=4, progress=False)
    save_quant_state(student, run / "student.safetensors")
    config = {"model": {"source": "local", "path": str(model_dir), "sampler": sampler.to_dict()},
              "method": {"name": "dilatequant"}, "quant": {"name": "w4a4"}, "seed": 0}
    OmegaConf.save(OmegaConf.create(config), run / "config.yaml")
    (run / "results.json").write_text(json.dumps({"complete": True, "method": "dilatequant", "quant": "w4a4"}))
    return model_dir, run


def test_export_command_writes_and_checks_the_integer_model(model_and_run, tmp_path, capsys):
    _, run = model_and_run
    out = tmp_path / "w4a4.safetensors"
    assert main([f"run={run}", f"out={out}", "verify=4"]) == 0
    printed = capsys.readouterr().out
    assert f"dq: exported {out}" in printed and "integer vs fake-quant student" in printed
    assert "dq: the check ran on cpu: " in printed  # device auto without CUDA; its time and peak memory
    meta = read_export(out).metadata
    assert meta["method"] == "dilatequant" and meta["quant"] == "w4a4" and meta["sampler"]["num_steps"] == STEPS
    assert meta["model_config"]["path"] == str(model_and_run[0]) and len(meta["source"]["student_sha256"]) == 64


def test_evaluate_takes_an_export(model_and_run, tmp_path):
    model_dir, run = model_and_run
    out = tmp_path / "w4a4.safetensors"
    assert main([f"run={run}", f"out={out}", "verify=0"]) == 0
    results = evaluate(compose_eval([*eval_overrides(model_dir, tmp_path / "eval", tmp_path / "cache"), f"export={out}"]))
    assert results["model_kind"] == "student" and results["execution"] == "integer"
    assert results["method"] == "dilatequant" and results["weight_bits"] == 4
    assert 10.0 < results["psnr_vs_fp"] < 80.0
    assert results["protocol"]["student"]["export"]["path"] == str(out)
    assert not (run / "metrics.json").exists()  # the fake-quant student's metrics are not overwritten


def test_evaluate_runs_the_export_compiled(model_and_run, tmp_path):
    model_dir, run = model_and_run
    out = tmp_path / "w4a4.safetensors"
    assert main([f"run={run}", f"out={out}", "verify=0"]) == 0
    scores = {}
    for glue in ("none", "fp32"):
        overrides = eval_overrides(model_dir, tmp_path / f"eval_{glue}", tmp_path / "cache")
        results = evaluate(compose_eval([*overrides, f"export={out}", f"int_compile={glue}"]))
        assert results["protocol"]["student"]["export"]["compiled"] == glue
        scores[glue] = results["psnr_vs_fp"]
    assert abs(scores["fp32"] - scores["none"]) < 0.5  # the same integer model; fused float glue rounds apart


@pytest.mark.parametrize("args,message", [
    (["run=/nonexistent/run"], "does not exist"),
    ([], "run=<train.py output dir> is required"),
    (["run=RUN", "colour=blue"], "unknown argument 'colour=blue'"),
    (["run=RUN", "float_dtype=float64"], "float_dtype must be one of"),
    (["run=RUN", "verify=some"], "verify must be a number"),
    (["run=RUN", "verify_seed=-1"], "verify_seed must be an int"),
    (["run=RUN", "device=tpu"], "device must be auto, cpu or cuda, got 'tpu'"),
    (["run=FP_EVAL_DIR"], "student.safetensors is missing"),
    (["run=INCOMPLETE"], "did not complete"),
    (["run=RUN", "out=EXISTING"], "exists; pass overwrite=true"),
    (["run=RUN", "out=EXISTING/student_int.safetensors"], "out EXISTING is not writable"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(model_and_run, tmp_path, capsys, args, message):
    _, run = model_and_run
    fp_eval = tmp_path / "fp_eval"
    fp_eval.mkdir()
    (fp_eval / "config.yaml").write_text("model: {source: embedded}\n")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(run, incomplete)
    (incomplete / "results.json").write_text(json.dumps({"complete": False}))
    existing = tmp_path / "existing.safetensors"
    existing.write_text("keep me")
    names = {"RUN": run, "FP_EVAL_DIR": fp_eval, "INCOMPLETE": incomplete, "EXISTING": existing}
    for placeholder, path in names.items():
        args = [a.replace(placeholder, str(path)) for a in args]
        message = message.replace(placeholder, str(path))
    before = {p: sorted(p.iterdir()) for p in (run, fp_eval, incomplete)}
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dq: error: ") and err.count("\n") == 1 and message in err
    assert {p: sorted(p.iterdir()) for p in (run, fp_eval, incomplete)} == before
    assert existing.read_text() == "keep me"

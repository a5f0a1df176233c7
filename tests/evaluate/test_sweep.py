"""Evaluating a sweep of run dirs: the FP model once, every run, then the report; resumable."""

import shutil

import pytest

from dq.evaluation.sweep import evaluate_sweep, sweep_runs
from tests.evaluate.conftest import eval_overrides


def test_sweep_evaluates_fp_and_runs_then_reports(model16_dir, student_run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib: pip install -r requirements-dev.txt")
    sweep = tmp_path / "sweep"
    for name in ("0_dilatequant_w8a8", "1_dilatequant_w8a8_again"):
        shutil.copytree(student_run_dir, sweep / name, ignore=shutil.ignore_patterns("metrics.json", "eval"))
    overrides = [o for o in eval_overrides(model16_dir, tmp_path, tmp_path / "cache")
                 if not o.startswith(("output_dir=", "model"))]
    report = evaluate_sweep(sweep, overrides).read_text()
    assert (sweep / "fp_eval" / "metrics.json").is_file()
    for run in sweep_runs(sweep):
        assert (run / "metrics.json").is_file() and (run / "eval" / "samples.npz").is_file()
    assert "| dilatequant | " in report and "Full-precision model: fid = " in report
    assert (sweep / "fid_vs_bits.png").is_file()
    # evaluated runs are skipped on a second call
    before = (sweep / "0_dilatequant_w8a8" / "metrics.json").read_text()
    evaluate_sweep(sweep, overrides)
    assert (sweep / "0_dilatequant_w8a8" / "metrics.json").read_text() == before


def test_empty_sweep_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no train.py run dirs"):
        evaluate_sweep(tmp_path, [])

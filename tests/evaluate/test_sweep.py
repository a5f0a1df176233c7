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


def test_seeded_sweep_evaluates_each_run_with_its_seed(model16_dir, student_run_dir, tmp_path):
    import json

    from omegaconf import OmegaConf

    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib: pip install -r requirements-dev.txt")
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        run = sweep / f"{seed}_dilatequant_w8a8"
        shutil.copytree(student_run_dir, run, ignore=shutil.ignore_patterns("metrics.json", "eval"))
        config = OmegaConf.load(run / "config.yaml")
        config.seed = seed
        OmegaConf.save(config, run / "config.yaml")
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "complete": True}))
    overrides = [o for o in eval_overrides(model16_dir, tmp_path, tmp_path / "cache")
                 if not o.startswith(("output_dir=", "model"))]
    with pytest.raises(ValueError, match="leave eval.seed out"):
        evaluate_sweep(sweep, [*overrides, "eval.seed=3"], seeded=True)
    report = evaluate_sweep(sweep, overrides, seeded=True).read_text()
    seeds = {}
    for seed in (0, 1):
        fp = json.loads((sweep / "fp_eval" / f"seed_{seed}" / "metrics.json").read_text())
        run = json.loads((sweep / f"{seed}_dilatequant_w8a8" / "metrics.json").read_text())
        assert fp["protocol"]["seed"] == run["protocol"]["seed"] == seed
        seeds[seed] = run["fid"]
    assert seeds[0] != seeds[1]  # new noise per seed: two different figures
    assert "| FP | fp | `(the FP model)` | 0,1 |" in report and "domain FID" in report
    # a run evaluated with another seed (e.g. by a plain sweep before --seeded) is evaluated again with its
    # own; one already at its own seed is left as it is
    stale = sweep / "1_dilatequant_w8a8" / "metrics.json"
    record = json.loads(stale.read_text())
    stale.write_text(json.dumps({**record, "fid": -1.0, "protocol": {**record["protocol"], "seed": 7}}))
    kept = (sweep / "0_dilatequant_w8a8" / "metrics.json").read_text()
    evaluate_sweep(sweep, overrides, seeded=True)
    again = json.loads(stale.read_text())
    assert again["protocol"]["seed"] == 1 and again["fid"] == pytest.approx(seeds[1])
    assert (sweep / "0_dilatequant_w8a8" / "metrics.json").read_text() == kept


def test_sweep_reevaluates_a_run_of_another_sample_count(model16_dir, student_run_dir, tmp_path):
    import json

    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib: pip install -r requirements-dev.txt")
    sweep = tmp_path / "sweep"
    shutil.copytree(student_run_dir, sweep / "0_dilatequant_w8a8", ignore=shutil.ignore_patterns("metrics.json", "eval"))
    overrides = [o for o in eval_overrides(model16_dir, tmp_path, tmp_path / "cache")
                 if not o.startswith(("output_dir=", "model"))]
    evaluate_sweep(sweep, overrides)
    metrics = sweep / "0_dilatequant_w8a8" / "metrics.json"
    n = json.loads(metrics.read_text())["protocol"]["num_samples"]
    evaluate_sweep(sweep, [*overrides, f"eval.num_samples={n + 4}"])
    assert json.loads(metrics.read_text())["protocol"]["num_samples"] == n + 4
    assert json.loads((sweep / "fp_eval" / "metrics.json").read_text())["protocol"]["num_samples"] == n + 4
    metrics.write_text("{not json")
    evaluate_sweep(sweep, [*overrides, f"eval.num_samples={n + 4}"])  # a corrupted record is redone, not trusted
    assert json.loads(metrics.read_text())["protocol"]["num_samples"] == n + 4

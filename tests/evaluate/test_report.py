"""The ablation report on fabricated run dirs: table, protocol check, duplicates, plot."""

import json
import uuid

import pytest

from dq.evaluation.report import collect_runs, main, render_markdown, write_report

PROTOCOL = {"backend": "digits", "feature_network": "dq digit classifier", "num_samples": 1000, "sampler": "ddim",
            "steps": 25, "eta": 0.0, "spacing": "quad", "guidance_scale": None, "seed": 0,
            "reference": {"source": "real digits", "count": 1797, "sha256": "ab" * 32},
            "code_version": {"git_commit": "deadbeef"}, "fid": "domain FID", "date": "2026-01-01T00:00:00+00:00"}


def _metrics(method, w, a, fid, psnr, **protocol):
    return {"method": method, "quant": "fp32" if method == "fp" else f"w{w}a{a}", "weight_bits": w, "act_bits": a,
            "fid": fid, "sfid": fid / 2, "is": 9.0, "psnr_vs_fp": psnr, "ssim_vs_fp": 0.9, "num_samples": 1000,
            "evaluation_id": uuid.uuid4().hex, "protocol": {**PROTOCOL, **protocol}}


def _run(root, name, method, w, a, fid=None, psnr=25.0, evaluated=True, **protocol):
    run = root / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"method": method, "quant": f"w{w}a{a}", "weight_bits": w,
                                                  "act_bits": a, "psnr_vs_fp": psnr - 1, "train_seconds": 12.5}))
    if evaluated:
        metrics = _metrics(method, w, a, fid, psnr, **protocol)
        (run / "metrics.json").write_text(json.dumps(metrics))
        return metrics
    return None


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    fids = {"ptq_minmax": (900.0, 80.0), "no_bkd": (300.0, 40.0), "no_wd": (60.0, 30.0), "no_tpq": (70.0, 31.0),
            "dilatequant": (40.0, 28.0)}
    for i, (method, (w4a4, w6a6)) in enumerate(fids.items()):
        _run(root, f"{2 * i}_{method}_w4a4", method, 4, 4, w4a4)
        _run(root, f"{2 * i + 1}_{method}_w6a6", method, 6, 6, w6a6)
    fp_dir = root / "fp_eval"
    fp_dir.mkdir()
    (fp_dir / "metrics.json").write_text(json.dumps(_metrics("fp", 32, 32, 25.0, None)))
    return root


def test_report_table_and_plot(sweep, capsys):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install -r requirements-dev.txt")
    main([str(sweep)])
    report = (sweep / "report.md").read_text()
    assert "| method | W4A4 | W6A6 |" in report
    assert "| dilatequant | 40.00 | 28.00 |" in report
    assert "| ptq_minmax | 900.00 | 80.00 |" in report
    assert "Full-precision model: fid = 25.00" in report
    assert "backend **digits**" in report and "N = 1000" in report and "Warning" not in report
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "W4A4" not in line]
    assert rows[:5] == ["ptq_minmax", "no_bkd", "no_wd", "no_tpq", "dilatequant"]
    png = (sweep / "fid_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "report ->" in capsys.readouterr().out


def test_copied_metrics_count_once_and_unevaluated_runs_are_listed(sweep):
    run = sweep / "0_ptq_minmax_w4a4"
    eval_dir = sweep / "evals" / "a"
    eval_dir.mkdir(parents=True)
    (eval_dir / "metrics.json").write_text((run / "metrics.json").read_text())  # evaluate.py's own copy
    _run(sweep, "99_dilatequant_w8a8", "dilatequant", 8, 8, evaluated=False)
    records = collect_runs([sweep])
    assert sum(r.method == "ptq_minmax" and r.bits == "W4A4" for r in records) == 1
    report = render_markdown(records, "fid", None)
    assert "| method | W4A4 | W6A6 | W8A8 |" in report
    assert "| dilatequant | 40.00 | 28.00 | — |" in report  # not evaluated: no FID
    assert "Not evaluated yet" in report and "99_dilatequant_w8a8" in report
    # its PSNR comes from results.json (train.py's 24.00), marked as such; evaluated ones carry no mark
    assert "| dilatequant | 25.00 | 25.00 | 24.00† |" in report
    assert "† train.py's figure on its fixed fidelity batch" in report
    assert "25.00†" not in report


def test_mixed_protocols_are_flagged(sweep):
    _run(sweep, "50_no_wd_w8a8", "no_wd", 8, 8, 20.0, num_samples=50)
    report = render_markdown(collect_runs([sweep]), "fid", None)
    assert "Warning: these runs were evaluated under 2 different protocols" in report


def test_psnr_table_and_empty_sweep(tmp_path, sweep):
    path = write_report([sweep], tmp_path / "out", metric="psnr_vs_fp", with_plot=False)
    report = path.read_text()
    assert "psnr_vs_fp (higher is better)" in report and "| dilatequant | 25.00 | 25.00 |" in report
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results.json or metrics.json"):
        write_report([tmp_path / "empty"], tmp_path / "out")

"""The fidelity report over seeds (python -m dq.evaluation.sweep --fidelity)."""

import json

import pytest

from dq.evaluation.seeds import collect_groups, render, write_seed_report
from dq.evaluation.sweep import main
from dq.metrics.kernel import KID_PROTOCOL


def _run(root, name, method, bits, seed, psnr, overrides=(), complete=True, kid_protocol=KID_PROTOCOL):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    lines = [f"- {o}" for o in (*overrides, f"seed={seed}", "hydra.run.dir=/x")]
    (run / ".hydra" / "overrides.yaml").write_text("\n".join(lines) + "\n")
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    w, a = bits
    results = {"complete": complete, "method": method, "weight_bits": w, "act_bits": a, "psnr_vs_fp": psnr,
               "ssim_vs_fp": 0.9, "mse_vs_fp": 1e-3, "kid_vs_fp": 2e-3, "train_seconds": 100.0,
               "prep_seconds": {"cache": 20.0, "init": 5.0}, "fidelity_protocol": {"kid": kid_protocol}}
    (run / "results.json").write_text(json.dumps(results))
    return run


@pytest.fixture
def sweep(tmp_path):
    for seed, psnr in enumerate([30.0, 31.0, 32.0]):
        _run(tmp_path, f"a{seed}", "dilatequant", (4, 4), seed, psnr, ["method.distill.lr_weights=1e-4"])
        _run(tmp_path, f"b{seed}", "dilatequant", (4, 4), seed, psnr - 2, ["method.distill.lr_weights=1e-5"])
        _run(tmp_path, f"c{seed}", "ptq_minmax", (4, 4), seed, 20.0, ["method=ptq_minmax"], kid_protocol="old")
    _run(tmp_path, "d0", "dilatequant", (4, 4), 3, 99.0, ["method.distill.lr_weights=1e-4"], complete=False)
    return tmp_path


def test_groups_by_overrides_without_the_seed(sweep):
    groups = {g.label: g for g in collect_groups([sweep])}
    assert set(groups) == {"method.distill.lr_weights=1e-4", "method.distill.lr_weights=1e-5", "method=ptq_minmax"}
    best = groups["method.distill.lr_weights=1e-4"]
    assert sorted(best.seeds) == [0, 1, 2]  # the incomplete seed-3 run is left out
    mean, std, n = best.stats("psnr_vs_fp")
    assert (mean, n) == (31.0, 3) and std == pytest.approx(1.0)
    assert best.prep_share() == pytest.approx(0.25)
    assert groups["method=ptq_minmax"].stats("psnr_vs_fp")[1] == 0.0
    assert best.stats("kid_vs_fp")[0] == pytest.approx(2e-3)
    assert groups["method=ptq_minmax"].stats("kid_vs_fp") is None  # an earlier KID estimator: not shown


def test_report_marks_the_best_mean_and_cli_writes_it(sweep, capsys):
    text = render(collect_groups([sweep]), None)
    assert "**31.00 ± 1.00**" in text and "29.00 ± 1.00" in text and "**29.00" not in text
    assert "| W4A4 | ptq_minmax |" in text and "25%" in text
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install -r requirements-dev.txt")
    out = sweep / "report"
    main(["--fidelity", str(sweep), "--out", str(out)])
    assert (out / "report.md").read_text() == render(collect_groups([sweep]), "psnr_over_seeds.png")
    assert (out / "psnr_over_seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert "report ->" in capsys.readouterr().out


def test_empty_and_missing_dirs(tmp_path, capsys):
    with pytest.raises(ValueError, match="no complete train.py results.json"):
        write_seed_report([tmp_path], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--fidelity", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"dq: error: {tmp_path / 'nope'} is not a directory\n"


def _metrics(directory, method, seed, fid, num_samples=1000):
    directory.mkdir(parents=True, exist_ok=True)
    protocol = {"backend": "digits", "num_samples": num_samples, "sampler": "ddim", "steps": 25, "spacing": "quad",
                "eta": 0.0, "seed": seed}
    (directory / "metrics.json").write_text(json.dumps({"method": method, "fid": fid, "protocol": protocol}))


def test_domain_fid_column_and_fp_row_over_seeds(sweep):
    for seed, fid in enumerate([40.0, 44.0, 48.0]):
        _metrics(sweep / f"a{seed}", "dilatequant", seed, fid)
        _metrics(sweep / "fp_eval" / f"seed_{seed}", "fp", seed, fid - 10)
    _metrics(sweep / "b0", "dilatequant", 0, 60.0)  # one of the three seeds evaluated
    groups = {g.label: g for g in collect_groups([sweep])}
    fp = groups["(the FP model)"]
    assert (fp.bits, sorted(fp.seeds)) == ("FP", [0, 1, 2])
    assert fp.stats("fid") == (34.0, pytest.approx(4.0), 3)
    assert groups["method.distill.lr_weights=1e-4"].stats("fid") == (44.0, pytest.approx(4.0), 3)
    assert groups["method.distill.lr_weights=1e-5"].stats("fid") == (60.0, 0.0, 1)
    assert groups["method=ptq_minmax"].stats("fid") is None
    text = render(list(groups.values()), None)
    assert "| FP | fp | `(the FP model)` | 0,1,2 | – | – | – | – | – | – | 34.00 ± 4.00 | – | – |" in text
    assert "**44.00 ± 4.00**" in text and "60.00 (1 seed)" in text
    assert "backend digits, num_samples 1000" in text and "mixes evaluation protocols" not in text
    _metrics(sweep / "c0", "ptq_minmax", 0, 90.0, num_samples=500)
    assert "mixes evaluation protocols" in render(collect_groups([sweep]), None)


def test_a_figure_missing_on_some_seeds_says_how_many(sweep):
    for seed in (0, 1):
        _metrics(sweep / f"a{seed}", "dilatequant", seed, 40.0 + seed)
    text = render(collect_groups([sweep]), None)
    assert "40.50 ± 0.71 (2 seeds)" in text

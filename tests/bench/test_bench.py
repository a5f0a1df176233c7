"""The benchmark scripts run end to end at tiny scale (their figures are measured, not asserted), and the
LDM architectures they time are the ones the converter builds."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from bench import bench_bkd, bench_conv, bench_forward, bench_int, block_prep
from bench.architectures import LDM_UNETS, build, random_inputs
from dq.export import compile_int_model
from dq.export.compiled import native_bf16
from dq.export.kernels import int8_products_saturate, onednn_available
from tests.conftest import write_model_folder
from tests.quant.conftest import tiny_unet2d
from tests.train.conftest import fast_overrides


def test_bench_bkd_prints_and_writes_both_methods(tmp_path, capsys):
    out = tmp_path / "bkd.json"
    bench_bkd.main(["--arch", "small", "--device", "cpu", "--iters", "2", "--blocks", "2", "--samples", "16",
                    "--batch", "8", "--capture-batch", "16", "--steps", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "QAT/BKD time per iteration" in printed
    figures = json.loads(out.read_text())
    bkd, qat = figures["rows"]
    assert bkd["blocks_measured"] == 2 and bkd["iterations_measured"] == 4
    assert qat["blocks_total"] == 1 and qat["iterations_measured"] == 2
    assert bkd["seconds_per_iteration"] > 0 and qat["seconds_per_iteration"] > 0
    assert figures["cache_device"] == "auto" and bkd["cache_devices"] == ["cpu"]


def test_block_prep_times_both_settings_and_finds_the_same_caches(tmp_path, capsys):
    model_dir = write_model_folder(tiny_unet2d(), tmp_path / "model")
    overrides = [o for o in fast_overrides(model_dir, tmp_path / "out", tmp_path / "cache")
                 if not o.startswith(("method.distill.capture_batch_size", "output_dir", "progress_bar"))]
    rows = block_prep.main([*overrides, "method.distill.capture_batch_size=16"])  # 2 chunks: stand-ins checked
    printed = capsys.readouterr().out
    assert "caches bitwise the same with and without replay: True" in printed
    off, on = rows
    assert off["replay_cache_mb"] == 0 and off["replay_peak_mib"] == 0 and on["replay_peak_mib"] > 0
    assert off["blocks"] == on["blocks"] > 10 and off["cache_hashes"] == on["cache_hashes"]
    assert off["seconds"]["replay_recording"] == 0 < on["seconds"]["replay_recording"]


def test_bench_forward_runs(capsys):
    bench_forward.main(["--arch", "small", "--device", "cpu", "--batch", "2", "--repeats", "1"])
    assert "student/FP =" in capsys.readouterr().out


def test_bench_int_compiled_baselines_run(monkeypatch):
    """The bench's compiled variants, wired and timed, with Inductor itself left out (it takes minutes on a small
    CPU): FP models' `compile()` does nothing here, and the compiled integer model, the real wrapper with its
    checks, runs its graph eagerly. The compiled integer model is tested in tests/export/test_compiled.py and,
    through evaluate.py, in tests/export/test_cli.py."""
    def eager_compile_int_model(model, glue="fp32"):
        wrapper = compile_int_model(model, glue)
        wrapper._compiled = wrapper._run
        return wrapper

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(bench_int, "compile_int_model", eager_compile_int_model)
    rows = bench_int.main(["--arch", "tiny", "--batch", "1", "--bits", "w4a4", "--repeats", "1"])
    variants = {row["variant"] for row in rows}
    assert {"compiled fp32 channels-last", "integer w4a4 compiled"} <= variants
    # compiled bfloat16 and bfloat16 glue only where the CPU runs bfloat16 natively (compile_int_model refuses
    # emulated glue; emulated compiled BF16 is no baseline anyone would run)
    assert ("compiled bf16 channels-last" in variants) == native_bf16()
    assert ("integer w4a4 compiled (bf16 glue)" in variants) == native_bf16()
    assert "bf16 channels-last" in variants
    assert all(row["ms"] > 0 for row in rows)


def test_bench_int_prints_every_variant_and_a_profile(tmp_path, capsys):
    out = tmp_path / "int.json"
    rows = bench_int.main(["--arch", "small", "--batch", "1,2", "--bits", "w4a4", "--repeats", "1", "--profile",
                           "--no-compile", "--json", str(out)])
    printed = capsys.readouterr().out
    variants = {row["variant"] for row in rows}
    assert variants == {"fp32", "fp32 channels-last", "bf16 channels-last", "fake-quant w4a4", "integer w4a4"}
    assert len(rows) == 10 and json.loads(out.read_text()) == rows
    for row in rows:  # every ratio is against the fastest non-quantized variant of its batch
        baseline = next(r for r in rows if r["batch"] == row["batch"] and r["variant"] == row["best_baseline"])
        assert row["best_baseline"] in {"fp32", "fp32 channels-last", "bf16 channels-last"}
        assert baseline["ms"] == min(r["ms"] for r in rows if r["batch"] == row["batch"] and "quant" not in r["variant"]
                                     and "integer" not in r["variant"])
    assert "(fastest non-quantized)" in printed
    integer = [row for row in rows if row["variant"] == "integer w4a4"]
    assert all(row["ms"] > 0 and row["export_mb"] > 0 for row in integer)
    assert integer[0]["weight_mb"] < rows[0]["weight_mb"] / 1.5  # int8 weights, plain and packed, against float32
    assert "top_ops" in integer[1] and "top_ops" not in integer[0]  # the largest batch is profiled
    assert "onednn::qconv_pointwise" in printed or "aten::_int_mm" in printed


@pytest.mark.skipif(not onednn_available(), reason="the integer convolution runs oneDNN's CPU kernel")
def test_bench_conv_times_each_variant_against_fp32(capsys):
    rows = bench_conv.main(["--shapes", "1x16x4,2x8x6", "--repeats", "1"])
    assert {row["shape"] for row in rows} == {"1x16x4", "2x8x6"} and len(rows) == 2 * 5
    planes = {row["variant"]: row.get("planes") for row in rows}
    # 8-bit weights against 8-bit codes run in two planes where int8 products saturate int16, as in an export
    assert planes == {"fp32": None, "bf16" if native_bf16() else "bf16 (emulated)": None, "int w4a4": 1,
                      "int w8a7": 1, "int w8a8": 2 if int8_products_saturate("onednn") else 1}
    fp32 = {row["shape"]: row["ms"] for row in rows if row["variant"] == "fp32"}
    for row in rows:  # the ratio of the unrounded times
        assert row["ms"] > 0 and row["x_fp32"] == pytest.approx(fp32[row["shape"]] / row["ms"], rel=0.05, abs=0.01)
    assert "GMAC/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_conv.main(["--shapes", "8x128"])


@pytest.mark.parametrize("name", sorted(LDM_UNETS))
def test_ldm_architectures(name):
    """Real size (hundreds of millions of parameters): built on the meta device, no forward."""
    with torch.device("meta"):
        unet = build(name)
    expected = UNet2DConditionModel if name == "ldm_imagenet" else UNet2DModel
    assert isinstance(unet, expected)
    assert sum(p.numel() for p in unet.parameters()) > 100e6
    inputs = random_inputs(unet, 2, torch.Generator().manual_seed(0))
    assert inputs["x_t"].shape[1:] == (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    assert ("cond" in inputs) == (name == "ldm_imagenet")
    if name == "ldm_church":  # 8 heads at 192, 384 and 768 channels: only the applied head counts say so
        heads = {m.heads for n, m in unet.named_modules() if n.endswith("attentions.0") and hasattr(m, "heads")}
        assert heads == {8}


def test_remap_table_scores_every_policy_against_the_retrained_student(tmp_path):
    from diffusers import DDPMScheduler
    from omegaconf import OmegaConf

    from bench import remap_table
    from dq.arch import describe
    from dq.quant import QuantConfig, calibrate_activations, quantize_model, save_quant_state
    from dq.sampling import SamplerConfig, sample
    from tests.conftest import write_model_folder
    from tests.evaluate.conftest import make_unet16

    model16_dir = write_model_folder(make_unet16(), tmp_path / "model")
    scheduler = DDPMScheduler.from_pretrained(model16_dir / "scheduler")
    runs = {}
    for steps in (4, 6):  # a 4-step student to remap, and a student trained for 6 steps
        sampler = SamplerConfig(name="ddim", num_steps=steps)
        unet = make_unet16()
        student = quantize_model(unet, QuantConfig(weight_bits=8, act_bits=8, num_steps=steps, num_groups=steps),
                                 describe(unet))
        with calibrate_activations(student):
            sample(student, scheduler.config, sampler, 2, batch_size=2, progress=False)
        run = runs[steps] = tmp_path / f"run{steps}"
        save_quant_state(student, run / "student.safetensors")
        model = {"source": "local", "path": str(model16_dir), "sampler": sampler.to_dict()}
        OmegaConf.save(OmegaConf.create({"model": model}), run / "config.yaml")
    remap_table.main(["--student", str(runs[4]), "--schedule", f"ddim:6={runs[6]}", "--num-samples", "3",
                      "--seeds", "1", "2", "--out", str(tmp_path / "table")])
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [(r["schedule"], r["policy"]) for r in rows] == [
        ("ddim 4", "trained (own schedule)"), ("ddim 6", "exact"), ("ddim 6", "trained"), ("ddim 6", "nearest"),
        ("ddim 6", "interpolate")]
    assert rows[1]["refused"] is True
    assert all(len(r["psnr"]["values"]) == 2 and r["psnr"]["mean"] > 10 for r in rows if "psnr" in r)
    table = (tmp_path / "table.md").read_text()
    assert "refused (one-line error)" in table and "student trained for this schedule" in table

"""bench/sensitivity.py: the layer ranking of mixed precision by sensitivity, on a tiny DiT student and on a
finished train.py run."""

import pytest
import torch

from bench import sensitivity
from dq.arch import describe
from dq.bkd.blocks import run_model
from dq.jobs.train import train
from dq.quant import QuantConfig, calibrate_activations, quantize_model
from tests.arch.test_transformers import T, _example, tiny_dit
from tests.conftest import write_model_folder
from tests.quant.conftest import tiny_unet2d
from tests.train.conftest import compose_config, fast_overrides


def test_ranking_is_the_error_each_layer_removes():
    model = tiny_dit()
    student = quantize_model(model, QuantConfig(weight_bits=8, act_bits=3, num_steps=T, num_groups=T), describe(model))
    tuples = _example("dit", model, n=8)
    with calibrate_activations(student), torch.no_grad():
        run_model(student, tuples)
    base, rows = sensitivity.rank_layers(student, model, tuples, batch=4)
    layers = {r["layer"] for r in rows}
    # every layer below promote_bits is ranked, the 8-bit first / last / modulation layers are not
    assert "transformer_blocks.0.ff.net.2" in layers and "pos_embed.proj" not in layers and "proj_out_1" not in layers
    assert [r["share"] for r in rows] == sorted((r["share"] for r in rows), reverse=True)
    top = rows[0]
    assert top["share"] > 0 and top["mse_without"] < base
    torch.testing.assert_close(top["share"], (base - top["mse_without"]) / base)
    assert all(q.enabled for q in (m.act_quantizer for m in student.modules() if hasattr(m, "act_quantizer")))
    assert sensitivity.promoted(rows, 0.1) == [r["layer"] for r in rows[:max(1, round(0.1 * len(rows)))]]
    assert sensitivity.promoted(rows, 0.0) == []


@pytest.mark.parametrize("bad", ["missing"])
def test_a_directory_that_is_no_run_is_refused(tmp_path, bad):
    with pytest.raises(SystemExit, match="is not a finished train.py run"):
        sensitivity.main(["--run", str(tmp_path / bad)])


def test_the_script_ranks_a_finished_run(tmp_path, capsys):
    model_dir = write_model_folder(tiny_unet2d(), tmp_path / "model")
    cfg = compose_config(fast_overrides(model_dir, tmp_path / "run", tmp_path / "cache", 2, end_to_end=None))
    train(cfg)
    sensitivity.main(["--run", str(tmp_path / "run"), "--tuples", "16", "--fractions", "0.2",
                      "--out", str(tmp_path / "sens")])
    printed = capsys.readouterr().out
    assert "student output MSE vs FP on 16 calibration tuples" in printed and "'quant.promote_layers=[" in printed
    assert (tmp_path / "sens" / "sensitivity.json").is_file()

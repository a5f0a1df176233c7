"""Bad inputs to train.py, evaluate.py, python -m dq.zoo.convert_compvis and the dq.quant API: each is one
`dq: error: ...` line naming the bad value, exit code 2, and no new files in the output directory.

The command-line cases run in this process through the same entry function the scripts use
(`dq.cli.run_hydra_entry` / `dq.cli.entry`); a few run as real subprocesses to check the exit status and
that nothing else reaches stderr."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dq.jobs.evaluate as evaluate_script
import dq.jobs.train as train_script
from dq.cli import run_hydra_entry
from dq.errors import MissingFileError, UserError
from dq.zoo.convert_compvis import main as convert_main

REPO = Path(__file__).resolve().parents[2]

# (arguments, a piece of the message that names the bad value); GARBAGE / AFILE / MODEL are filled in
TRAIN_CASES = [
    (["quant=w5a5"], "Could not find 'quant/w5a5'; Available options in 'quant': w4a4, w4a8, w6a6, w8a8"),
    (["trainer=tpu"], "'trainer/tpu'"),
    (["quant.weight_bits=0"], "QuantConfig.weight_bits must be an int in [2, 16], got 0"),
    (["quant.act_bits=3.5"], "QuantConfig.act_bits must be an int in [2, 16], got 3.5"),
    (["quant.weight_bits2=3"], "Could not override 'quant.weight_bits2'"),
    (["quant.include=[]"], "QuantConfig.include must hold at least one pattern"),
    (["fidelity.num_samples=abc"], "fidelity.num_samples must be an int >= 2, got 'abc'"),
    (["fidelity.num_samples=1"], "fidelity.num_samples must be an int >= 2, got 1"),
    (["fidelity.features=clip"], "fidelity.features must be one of"),
    (["seed=-1"], "seed must be an int >= 0, got -1"),
    (["checkpoint_every_n_steps=0"], "checkpoint_every_n_steps must be an int >= 1, got 0"),
    (["data.num_samples=0"], "data.num_samples must be an int >= 1, got 0"),
    (["method.tpq_groups=0"], "method.tpq_groups must be an int >= 1, got 0"),
    (["method.distill.iters_per_block=x"], "method.distill.iters_per_block must be int, got 'x'"),
    (["+method.distill.foo=1"], "unknown method.distill key(s) ['foo']"),
    (["method.distill.lr_quant=0"], "lr_quant > 0"),
    (["method.distill.cache_device=tpu"], "cache_device must be 'cpu', 'auto', 'disk', 'cuda' or 'cuda:N', got 'tpu'"),
    (["model=local", "model.path=/nonexistent/model"], "model folder /nonexistent/model does not exist"),
    (["model.sampler.name=euler"], "sampler name must be one of"),
    (["model.sampler.num_steps=0"], "model.sampler.num_steps must be an int >= 1, got 0"),
    (["ckpt_path=/nonexistent.ckpt"], "ckpt_path /nonexistent.ckpt does not exist"),
    (["budget.host_memory_gb=0.00001"], "this run does not fit: its"),
    (["ckpt_path=GARBAGE"], "is not a readable PyTorch checkpoint"),
    (["data.cache_dir=AFILE/cache"], "data.cache_dir AFILE/cache is not writable"),
]
EVALUATE_CASES = [
    (["eval=foo"], "Could not find 'eval/foo'; Available options in 'eval': cifar10_paper, cleanfid, default, inception"),
    (["eval.num_samples=1"], "eval.num_samples must be >= 2"),
    (["eval.backend=xyz"], "eval.backend must be one of"),
    (["eval.metrics=[fid,abc]"], "eval.metrics has unknown metric(s) ['abc']"),
    (["tpq_policy=sometimes"], "tpq_policy must be one of ['exact', 'nearest', 'interpolate'], got 'sometimes'"),
    (["int_backend=cuda9"], "int_backend must be one of"),
    (["eval.batch_size=0"], "eval.batch_size must be an int >= 1, got 0"),
    (["run=/nonexistent/run"], "run=/nonexistent/run is not a train.py output dir"),
    (["export=GARBAGE"], "is not a readable safetensors file"),
    (["sampler.num_steps=-3"], "sampler num_steps must be a positive int, got -3"),
    # an override the run dir or the export would drop: refused before the run dir is even read
    (["run=/nonexistent/run", "model.sampler.num_steps=13"],
     "model.sampler.num_steps=13 does nothing with run=: a run dir brings its own model and sampler"),
    (["export=GARBAGE", "model=ddpm_cifar10"], "model=ddpm_cifar10 does nothing with export=:"),
    (["int_backend=gemm"], "int_backend=gemm does nothing without export="),
    (["int_compile=fp32"], "int_compile=fp32 does nothing without export="),
    (["int_compile=fp16"], "int_compile must be one of"),
]
CONVERT_CASES = [
    (["--ckpt", "/nonexistent.ckpt", "--config", "CONFIG", "--out", "OUT"], "checkpoint /nonexistent.ckpt does not exist"),
    (["--ckpt", "GARBAGE", "--config", "CONFIG", "--out", "OUT"], "is not a readable PyTorch checkpoint"),
    (["--ckpt", "GARBAGE", "--config", "GARBAGE", "--out", "OUT"], "garbage.bin is not a readable YAML config"),
    (["--ckpt", "GARBAGE", "--config", "CONFIG"], "the following arguments are required: --out"),
    (["--ckpt", "GARBAGE", "--config", "CONFIG", "--out", "OUT", "--ema", "--no-ema"], "not allowed with argument"),
]


@pytest.fixture
def places(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x87" * 64)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    config = tmp_path / "ldm.yaml"
    config.write_text("model:\n  params:\n    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n")
    return {"GARBAGE": str(garbage), "AFILE": str(a_file), "CONFIG": str(config), "OUT": str(tmp_path / "converted")}


def fill(args, places):
    out = []
    for arg in args:
        for key, value in places.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def hydra_main(script):
    """The job's @hydra.main function (its config path is the package's conf/, absolute)."""
    return script.main


def run_in_process(script, args, run_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script.__file__, *args, f"hydra.run.dir={run_dir}"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("DQ_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_hydra_entry(hydra_main(script))
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(code, err, message):
    assert code == 2, err
    assert err.startswith("dq: error: ") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize("args,message", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_train_bad_input(args, message, places, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    cache = tmp_path / "cache"
    args = fill([*args, *([] if any(a.startswith("data.cache_dir") for a in args) else [f"data.cache_dir={cache}"])],
                places)
    code, err = run_in_process(train_script, args, run_dir, monkeypatch, capsys)
    assert_one_line(code, err, fill([message], places)[0])
    assert not run_dir.exists() and not cache.exists()


@pytest.mark.parametrize("args,message", EVALUATE_CASES, ids=[" ".join(a) for a, _ in EVALUATE_CASES])
def test_evaluate_bad_input(args, message, places, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "eval"
    args = fill([*args, f"eval.fp_cache_dir={tmp_path / 'fp_cache'}"], places)
    code, err = run_in_process(evaluate_script, args, run_dir, monkeypatch, capsys)
    assert_one_line(code, err, message)
    assert not run_dir.exists()


@pytest.mark.parametrize("args,message", CONVERT_CASES, ids=[" ".join(a) for a, _ in CONVERT_CASES])
def test_convert_compvis_bad_input(args, message, places, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(fill(args, places))
    assert_one_line(exit_info.value.code, capsys.readouterr().err, message)
    assert not Path(places["OUT"]).exists()


def test_convert_compvis_refuses_a_non_empty_out(places, capsys):
    out = Path(places["OUT"])
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    with pytest.raises(SystemExit) as exit_info:
        convert_main(fill(["--ckpt", "GARBAGE", "--config", "CONFIG", "--out", "OUT"], places))
    assert_one_line(exit_info.value.code, capsys.readouterr().err, "exists and is not empty; pass --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_debug_shows_the_stack(places, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", "quant.weight_bits=0", "--debug", f"hydra.run.dir={tmp_path / 'run'}"])
    monkeypatch.delenv("DQ_DEBUG", raising=False)
    with pytest.raises(UserError, match="weight_bits"):
        run_hydra_entry(hydra_main(train_script))


def test_unwritable_output_dir_is_refused_before_any_work(places, tmp_path, monkeypatch, capsys):
    code, err = run_in_process(train_script, [f"data.cache_dir={tmp_path / 'cache'}"], f"{places['AFILE']}/run",
                               monkeypatch, capsys)
    assert_one_line(code, err, f"{places['AFILE']}/run: Not a directory")
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- the dq.quant API


def test_quant_api_bad_inputs(tmp_path):
    from dq.arch import describe
    from dq.quant import QuantConfig, load_quant_state, quantize_model, set_step
    from tests.quant.conftest import tiny_unet2d

    with pytest.raises(UserError, match=r"QuantConfig.weight_bits must be an int in \[2, 16\], got 1"):
        QuantConfig(weight_bits=1)
    with pytest.raises(UserError, match=r"QuantConfig.act_init must be one of .* got 'median'"):
        QuantConfig(act_init="median")
    with pytest.raises(UserError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"weight_bits": 4, "bits": 4})
    unet = tiny_unet2d()
    student = quantize_model(unet, QuantConfig(num_steps=4, num_groups=4), describe(unet))
    with pytest.raises(UserError, match="already quantized"):
        quantize_model(student, QuantConfig(num_steps=4, num_groups=4), describe(student))
    with pytest.raises(UserError, match="step must be"):
        set_step(student, "first")
    with pytest.raises(MissingFileError, match="no quantization state file"):
        load_quant_state(unet, tmp_path / "nothing.safetensors", describe(unet))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_quant_state(unet, garbage, describe(unet))


# ----------------------------------------------------------------------------- real processes


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["quant=w5a5"], "Available options in 'quant': w4a4, w4a8, w6a6, w8a8"),
    ("train.py", ["quant.weight_bits=0"], "QuantConfig.weight_bits must be an int in [2, 16], got 0"),
    ("evaluate.py", ["eval.num_samples=1"], "eval.num_samples must be >= 2"),
])
def test_scripts_exit_2_with_one_stderr_line(script, args, message, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DQ_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, str(REPO / script), *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("dq: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "run").exists()

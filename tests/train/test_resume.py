"""Resume is safe: a checkpoint from another configuration is refused naming the differing keys, and a run
killed (SIGKILL) in any phase, resumed with the README's command, ends with the results of an uninterrupted
run. Outputs are all-or-nothing: a killed run leaves no results.json."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dq.errors import CorruptFileError, MismatchError
from dq.jobs.train import train
from dq.resume import differences
from tests.train.conftest import compose_config
from tests.train.conftest import fast_overrides as _fast

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("psnr_vs_fp", "mse_vs_fp", "ssim_vs_fp")


def fast_overrides(*args, **kwargs) -> list[str]:
    """The tests' fast run, with a checkpoint after every step (kills and stops land mid-block)."""
    return _fast(*args, checkpoint_every=1, **kwargs)


def test_differences_name_nested_keys():
    saved = {"quant": {"weight_bits": 4, "include": ["*"]}, "seed": 0, "model": "a"}
    current = {"quant": {"weight_bits": 6, "include": ("*",)}, "seed": 0, "model": "b", "extra": 1}
    assert differences(saved, current) == ["extra", "model", "quant.weight_bits"]


def test_resume_with_another_config_is_refused(tiny_model_dir, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    train(compose_config(fast_overrides(tiny_model_dir, run, cache)))
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    with pytest.raises(MismatchError, match=r"differing: .*quant\.act_bits.*quant\.weight_bits"):
        train(compose_config([*fast_overrides(tiny_model_dir, run, cache), "quant=w6a6", "ckpt_path=last"]))
    with pytest.raises(MismatchError, match=r"differing: calibration, method\.distill\.lr_weights, seed"):
        train(compose_config([*fast_overrides(tiny_model_dir, run, cache), "seed=1",
                              "method.distill.lr_weights=0.5", f"ckpt_path={last}"]))
    # where the cache lives or how big a capture batch is changes nothing the student depends on
    resumed = train(compose_config([*fast_overrides(tiny_model_dir, run, cache), "method.distill.capture_batch_size=16",
                                    "ckpt_path=last"]))
    assert resumed["complete"]
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match="not a readable PyTorch checkpoint"):
        train(compose_config([*fast_overrides(tiny_model_dir, run, cache), "ckpt_path=last"]))


def _run(args: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("DQ_FAULT_KILL_AT", None)
    if kill_at:
        env["DQ_FAULT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _overrides(model_dir: Path, run: Path, cache: Path) -> list[str]:
    args = [a for a in fast_overrides(model_dir, run, cache, iters=3) if not a.startswith("output_dir=")]
    return [*args, f"hydra.run.dir={run}"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    done = _run(_overrides(tiny_model_dir, root / "run", root / "cache"), root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "run" / "results.json").read_text())


# calibration: before the tuples exist; prepare:3: building block 3's cache; train:5: inside block 2 (3
# iterations a block, a checkpoint after every step); fidelity: after training; write: the student is on
# disk, results.json is not
@pytest.mark.parametrize("phase", ["calibration", "prepare:3", "train:5", "fidelity", "write"])
def test_kill_in_each_phase_then_resume_gives_the_same_results(phase, uninterrupted, tiny_model_dir, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    killed = _run(_overrides(tiny_model_dir, run, cache), tmp_path, kill_at=phase)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "results.json").exists()
    resumed = _run([*_overrides(tiny_model_dir, run, cache), "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] is True
    for key in FIGURES:
        assert results[key] == pytest.approx(uninterrupted[key], rel=1e-4, abs=1e-6), key
    assert results["block_final_losses"].keys() == uninterrupted["block_final_losses"].keys()
    for name, loss in uninterrupted["block_final_losses"].items():
        assert results["block_final_losses"][name] == pytest.approx(loss, rel=1e-4, abs=1e-9), name

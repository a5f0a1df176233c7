"""The calibration cache heals: a file that fails to load (bytes flipped, truncated, another key, not a
cache) is reported in one warning, moved aside and generated again; two processes sharing one cache dir
generate an entry once and never read a half-written file."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dq.calibration import load_tuples, save_tuples
from dq.errors import CorruptFileError
from tests.calibration.test_datamodule import make_datamodule
from tests.conftest import write_model_folder
from tests.quant.conftest import tiny_unet2d

REPO = Path(__file__).resolve().parents[2]


def replace_bytes(path: Path, data: bytes) -> None:
    """Damage as a new file (loaded tensors may still map the old one)."""
    staging = path.with_name(path.name + ".damaged")
    staging.write_bytes(data)
    os.replace(staging, path)


def flip_data_bytes(path: Path) -> None:
    """Change bytes near the end (the tensor data, past the JSON header safetensors checks)."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 40, len(data) - 8):
        data[offset] ^= 0x5A
    replace_bytes(path, bytes(data))


def truncate(path: Path) -> None:
    replace_bytes(path, path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    replace_bytes(path, b"\x00\x01not a safetensors file at all")


def other_key(path: Path) -> None:
    tuples, metadata = load_tuples(path)
    save_tuples(path, tuples, {**metadata, "key": "0123456789abcdef0123"})


@pytest.mark.parametrize("damage", [flip_data_bytes, truncate, garbage, other_key])
def test_unusable_cache_is_moved_aside_and_regenerated(damage, tiny_unet, ddpm_scheduler, tmp_path, caplog):
    first = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    first.setup()
    assert first.cache_event == "generated"
    expected = {key: value.clone() for key, value in first.tuples.items()}
    path = first.cache_path()
    damage(path)
    with pytest.raises(CorruptFileError, match=str(path.name)):
        first._read_checked(path)

    again = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dq.calibration.datamodule"):
        again.setup()
    assert again.cache_event == "regenerated"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "generating it again" in warnings[0]
    assert path.with_name(path.name + ".corrupt").is_file()
    for key in expected:
        assert torch.equal(again.tuples[key], expected[key]), key
    third = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    third.setup()
    assert third.cache_event == "read"


def test_content_hash_catches_changed_tensor_bytes(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tuples(path, {"x": torch.arange(64, dtype=torch.float32)}, {"key": "k"})
    assert load_tuples(path)[1]["content_hash"]
    flip_data_bytes(path)
    with pytest.raises(CorruptFileError, match="content hash"):
        load_tuples(path)


def test_stale_staging_files_of_dead_processes_are_removed(tiny_unet, ddpm_scheduler, tmp_path):
    dm = make_datamodule(tiny_unet, ddpm_scheduler, tmp_path)
    path = dm.cache_path()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = path.with_name(f".{path.name}.x1y2z3.tmp-{int(dead.stdout)}")
    stale.write_bytes(b"half")
    dm.setup()
    assert not stale.exists() and dm.cache_event == "generated"


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from diffusers import DDPMScheduler, UNet2DModel
    import dq.calibration.datamodule as datamodule
    from dq.sampling import SamplerConfig

    folder, cache, name, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    generate = datamodule.generate_shard
    def slow_generate(*args, **kwargs):  # hold the entry long enough for the other process to arrive
        time.sleep(2.0)
        return generate(*args, **kwargs)
    datamodule.generate_shard = slow_generate
    unet = UNet2DModel.from_pretrained(folder / "unet")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    dm = datamodule.CalibrationDataModule(
        unet, scheduler.config, SamplerConfig(name="ddim", num_steps=5, eta=0.0, spacing="quad"),
        num_samples=40, num_trajectories=12, batch_size=8, generation_batch_size=5, seed=0,
        cache_dir=cache, progress=False)
    (cache.parent / f"ready-{{name}}").touch()
    while len(list(cache.parent.glob("ready-*"))) < 2:  # start setup together
        time.sleep(0.01)
    dm.setup()
    import torch
    torch.save(dm.tuples, out)
    print(dm.cache_event)
""")


def test_two_processes_share_one_cache_entry(tmp_path):
    folder = write_model_folder(tiny_unet2d(), tmp_path / "model")
    cache = tmp_path / "shared" / "cache"
    cache.parent.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    children = [subprocess.Popen([sys.executable, str(script), str(folder), str(cache), name,
                                  str(tmp_path / f"{name}.pt")], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    results = [child.communicate(timeout=240) for child in children]
    for child, (_out, err) in zip(children, results):
        assert child.returncode == 0, err
    events = sorted(out.strip().splitlines()[-1] for out, _ in results)
    assert events == ["generated", "read"]  # one process generated, the other waited and read it
    a, b = (torch.load(tmp_path / f"{name}.pt") for name in ("a", "b"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    entries = [p.name for p in cache.iterdir() if p.suffix == ".safetensors"]
    assert len(entries) == 1 and not list(cache.glob("*.tmp-*"))

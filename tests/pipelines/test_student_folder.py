"""dq.save_student / dq.load_student: one folder, one call, offline, no Lightning or Hydra; every broken
folder gives one clear error."""

import json

import pytest
import torch

import dq
from dq.errors import UserError
from dq.export import export_student
from dq.pretrained import MANIFEST, STATE_FILE, StudentFolderError, add_export, read_manifest
from dq.quant import quant_config, step_context, timestep_keying
from dq.sampling import unet_forward
from tests.conftest import frameworks_imported_by
from tests.export.conftest import TINY_TIMESTEPS, tiny_student


@pytest.fixture
def folder(tmp_path):
    _, student = tiny_student(8, 8)
    return student, dq.save_student(student, tmp_path / "student", timesteps=TINY_TIMESTEPS,
                                    scheduler_config={"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})


def test_round_trip_gives_the_same_student_keyed_by_timestep(folder):
    student, path = folder
    assert sorted(p.name for p in path.iterdir()) == ["config.json", MANIFEST, "scheduler", STATE_FILE]
    assert json.loads((path / "config.json").read_text())["_class_name"] == "UNet2DModel"
    loaded = dq.load_student(path, tpq_policy="nearest")
    assert not quant_config(loaded).diff(quant_config(student))
    assert timestep_keying(loaded).timestep_list() == TINY_TIMESTEPS and timestep_keying(loaded).policy == "nearest"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), step_context(student, 1):
        expected = unet_forward(student, x, torch.tensor([500, 500]))
    with torch.no_grad():
        assert torch.equal(unet_forward(loaded, x, torch.tensor([500, 500])), expected)


def test_integer_model_from_the_folder_export(folder, tmp_path):
    student, path = folder
    with pytest.raises(StudentFolderError, match="holds no integer export"):
        dq.load_student(path, integer=True)
    export = export_student(student, tmp_path / "e.safetensors", TINY_TIMESTEPS)
    add_export(path, export)
    assert "student_int.safetensors" in read_manifest(path)["files"]
    model = dq.load_student(path, integer=True, tpq_policy="interpolate")
    assert timestep_keying(model).policy == "interpolate"
    with torch.no_grad():
        assert torch.isfinite(unet_forward(model, torch.randn(1, 3, 8, 8), torch.tensor([700]))).all()
    # compiled (it compiles on its first call: tests/export/test_compiled.py runs that), and its bad inputs
    from dq.export import CompiledIntModel
    from dq.export.kernels import onednn_available

    if onednn_available():
        compiled = dq.load_student(path, integer=True, compile="fp32")
        assert isinstance(compiled, CompiledIntModel) and compiled.glue == "fp32"
    with pytest.raises(UserError, match="load it with integer=True"):
        dq.load_student(path, compile="fp32")
    with pytest.raises(UserError, match="compile must be 'none' or one of"):
        dq.load_student(path, integer=True, compile="fp16")
    with pytest.raises(UserError, match="runs the gemm backend here"):
        dq.load_student(path, integer=True, backend="gemm", compile="fp32")


def test_loading_imports_no_lightning_or_hydra(folder):
    code = (
        "import torch, dq\n"
        f"m = dq.load_student({str(folder[1])!r})\n"
        "m(torch.zeros(1, 3, 8, 8), torch.tensor([900]))\n"
    )
    assert frameworks_imported_by(code) == []


def test_broken_folders_give_one_clear_error(folder, tmp_path):
    _, path = folder
    with pytest.raises(StudentFolderError, match="does not exist"):
        dq.load_student(tmp_path / "nowhere")
    with pytest.raises(StudentFolderError, match=f"{MANIFEST} is missing"):
        dq.load_student(tmp_path)
    with pytest.raises(ValueError, match="tpq_policy must be one of"):
        dq.load_student(path, tpq_policy="closest")
    manifest = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(manifest[:40])
    with pytest.raises(StudentFolderError, match="not valid JSON"):
        dq.load_student(path)
    (path / MANIFEST).write_text(manifest)
    state = (path / STATE_FILE).read_bytes()
    (path / STATE_FILE).write_bytes(state[: len(state) // 2])
    with pytest.raises(StudentFolderError, match="corrupted or truncated"):
        dq.load_student(path)
    (path / STATE_FILE).unlink()
    with pytest.raises(StudentFolderError, match="incomplete"):
        dq.load_student(path)


def test_saving_is_all_or_nothing(tmp_path):
    _, student = tiny_student()
    with pytest.raises(ValueError, match="pass timesteps="):
        dq.save_student(student, tmp_path / "a")
    with pytest.raises(ValueError, match="4 timesteps given for TPQ tables of 3"):
        dq.save_student(student, tmp_path / "a", timesteps=[1, 2, 3, 4])
    with pytest.raises(FileNotFoundError, match="export file"):
        dq.save_student(student, tmp_path / "a", timesteps=TINY_TIMESTEPS, export=tmp_path / "missing.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no staging leftovers
    dq.save_student(student, tmp_path / "a", timesteps=TINY_TIMESTEPS)
    with pytest.raises(FileExistsError):
        dq.save_student(student, tmp_path / "a", timesteps=TINY_TIMESTEPS)
    dq.save_student(student, tmp_path / "a", timesteps=TINY_TIMESTEPS, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

"""Reference statistics: the command for a folder of images, the file formats, and the refusal of
statistics made with another feature network."""

import numpy as np
import pytest
import torch
from PIL import Image

from dq.metrics import FeatureStats
from dq.metrics.backends import build_backend
from dq.metrics.images import read_images
from dq.metrics.reference import (
    digit_reference_images,
    load_statistics,
    main,
    resolve_reference,
    save_statistics,
)


@pytest.fixture(scope="module")
def backend():
    return build_backend("digits")


def _write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{k:04d}.png")


def test_command_on_a_folder_of_pngs_matches_the_images_in_memory(tmp_path, backend):
    images = digit_reference_images()[:200]
    _write_pngs(tmp_path / "pngs" / "nested", images)
    assert torch.equal(read_images(sorted((tmp_path / "pngs" / "nested").glob("*.png"))), images)
    main(["--backend", "digits", "--images", str(tmp_path / "pngs"), "--out", str(tmp_path / "ref.safetensors")])
    stats, metadata = load_statistics(tmp_path / "ref.safetensors")
    assert metadata["backend_identity"] == backend.identity() and metadata["counts"]["fid"] == 200
    assert (tmp_path / "ref.json").is_file()
    direct = FeatureStats.from_features(backend.extract(images)["fid"])
    torch.testing.assert_close(stats["fid"].mean, direct.mean)
    # the folder itself as eval.reference gives the same statistics
    from_folder, record = resolve_reference(str(tmp_path / "pngs"), backend)
    torch.testing.assert_close(from_folder["fid"].cov, stats["fid"].cov)
    assert record["count"] == 200


def test_statistics_of_another_network_are_refused(tmp_path, backend):
    stats = {"fid": FeatureStats(torch.zeros(64, dtype=torch.float64), torch.eye(64, dtype=torch.float64), 10)}
    save_statistics(tmp_path / "other.safetensors", stats, {"backend_identity": "inception-torchscript-clean299:abc"})
    with pytest.raises(ValueError, match="not comparable"):
        resolve_reference(str(tmp_path / "other.safetensors"), backend)


def test_npz_statistics_load_without_pickle(tmp_path, backend):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(256), sigma_s=np.eye(256))
    stats, record = resolve_reference(str(tmp_path / "stats.npz"), backend)
    assert set(stats) == {"fid", "sfid"} and stats["fid"].count is None
    assert "not recorded" in record["note"]
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="expected mu and sigma"):
        load_statistics(tmp_path / "bad.npz")


def test_auto_reference_is_for_the_digits_backend_only(monkeypatch, backend):
    stats, record = resolve_reference("auto", backend)
    assert record["spec"] == "auto" and record["count"] == 1797 and len(record["sha256"]) == 64
    monkeypatch.setattr(backend, "name", "inception")
    with pytest.raises(ValueError, match="eval.reference=auto means the committed digit statistics"):
        resolve_reference("auto", backend)


def test_bad_reference_specs_fail_clearly(tmp_path, backend):
    with pytest.raises(ValueError, match="not found"):
        resolve_reference(str(tmp_path / "missing.safetensors"), backend)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        resolve_reference(str(tmp_path / "empty"), backend)
    with pytest.raises(ValueError, match="use eval.backend=cleanfid"):
        resolve_reference("cleanfid:cifar10/32/train", backend)

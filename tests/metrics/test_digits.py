"""The committed digit classifier and the committed reference statistics of the real digits."""

import json

import pytest
import torch

from dq.data import load_digit_images
from dq.metrics import FeatureStats, inception_score, to_uint8
from dq.metrics.backends import build_backend
from dq.metrics.digit_classifier import CLASSIFIER_PATH, load_classifier, stratified_split
from dq.metrics.reference import DIGITS_REFERENCE_PATH, digit_reference_images, load_statistics


@pytest.fixture(scope="module")
def backend():
    return build_backend("digits", batch_size=512)


@pytest.fixture(scope="module")
def reference():
    return load_statistics(DIGITS_REFERENCE_PATH)


def test_committed_classifier_is_small_and_accurate():
    assert CLASSIFIER_PATH.stat().st_size < 2**20
    model, record = load_classifier()
    assert record["val_accuracy"] >= 0.97 and record["num_val"] >= 300
    images, labels = load_digit_images()
    with torch.no_grad():
        assert (model(images).argmax(dim=1) == labels).float().mean() > 0.98
    assert json.loads(CLASSIFIER_PATH.with_suffix(".json").read_text())["val_accuracy"] == record["val_accuracy"]


def test_stratified_split_holds_out_every_class():
    labels = torch.arange(10).repeat_interleave(20)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(val) == 40 and len(set(train.tolist()) | set(val.tolist())) == 200
    assert torch.bincount(labels[val]).tolist() == [4] * 10


def test_committed_reference_is_the_real_digits(backend, reference):
    stats, metadata = reference
    assert metadata["backend_identity"] == backend.identity()
    assert metadata["counts"] == {"fid": 1797, "sfid": 1797}
    features = backend.extract(digit_reference_images())
    for name in ("fid", "sfid"):
        recomputed = FeatureStats.from_features(features[name])
        torch.testing.assert_close(recomputed.mean, stats[name].mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(recomputed.cov, stats[name].cov, rtol=1e-4, atol=1e-3)
        assert abs(backend.frechet(features[name], stats[name])) < 1e-3


def test_domain_fid_grows_with_noise_and_real_digits_score_high_is(backend, reference):
    stats, _ = reference
    images = load_digit_images()[0]
    generator = torch.Generator().manual_seed(0)
    fids = []
    for scale in (0.1, 0.2, 0.4):
        noisy = to_uint8(images + scale * torch.randn(images.shape, generator=generator))
        fids.append(backend.frechet(backend.extract(noisy)["fid"], stats["fid"]))
    assert fids[0] < fids[1] < fids[2], fids
    probs = backend.extract(digit_reference_images())["is"]
    assert inception_score(probs, splits=10)[0] > 9.5  # near 10: balanced classes, confident predictions


def test_digits_backend_refuses_other_image_sizes(backend):
    with pytest.raises(ValueError, match="needs 16x16 images"):
        backend.extract(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        backend.extract(torch.zeros(2, 1, 16, 16))

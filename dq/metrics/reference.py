"""Reference statistics: the Gaussians of real images' features that FID and sFID compare samples with.

    python -m dq.metrics.reference --backend digits --images digits \
        --out dq/metrics/assets/digits_reference.safetensors          # the committed ones (~2 s)
    python -m dq.metrics.reference --backend inception --images /data/cifar10-train-png --out cifar10.safetensors

A statistics file is safetensors (`<metric>.mean` float64 [D], `<metric>.cov` float64 [D, D] for each of
fid / sfid) with JSON metadata in its header (backend identity, count, source) and a readable `.json`
copy beside it. Evaluation refuses statistics made by another feature network or preprocessing.

`--images digits` is the embedded model's training set (dq.data.load_digit_images, 1,797 real digits at
16x16) rendered to uint8 exactly as saved samples are, so reference and samples meet the same
quantisation; any other value is a folder of images (PNG/JPEG/..., searched recursively, sorted).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import dq
from dq import cli
from dq.errors import UserError
from dq.io import atomic_write, file_sha256
from dq.metrics.backends import CleanFIDBackend, FeatureBackend, build_backend, display_path
from dq.metrics.frechet import FeatureStats
from dq.metrics.images import image_files, iter_image_batches, to_uint8

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DIGITS_REFERENCE_PATH = ASSETS_DIR / "digits_reference.safetensors"
METADATA_KEY = "dq_reference"
FRECHET_METRICS = ("fid", "sfid")
DIGITS_SOURCE = "digits"


def digit_reference_images() -> torch.Tensor:
    """uint8 [1797, 1, 16, 16]: the embedded model's training digits as saved samples would hold them."""
    from dq.data import load_digit_images

    return to_uint8(load_digit_images()[0])


def reference_images(spec: str, batch_size: int) -> tuple[Iterator[torch.Tensor], str, int]:
    """(uint8 image batches, description, count) of "digits" (the embedded model's training set) or of a
    folder of images."""
    if spec == DIGITS_SOURCE:
        images = digit_reference_images()
        description = ("the embedded model's training set: scikit-learn load_digits, 1,797 real digits at 16x16 "
                       "(dq.data.load_digit_images), as uint8 pixels round((x + 1) * 127.5)")
        return iter([images]), description, len(images)
    files = image_files(spec)
    return iter_image_batches(files, batch_size), f"image folder {spec} ({len(files)} files)", len(files)


def compute_statistics(backend: FeatureBackend, batches: Iterator[torch.Tensor]) -> dict[str, FeatureStats]:
    """FeatureStats per Fréchet metric of the backend over uint8 image batches [B, C, H, W]."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for key, value in backend.extract(batch).items():
            if key in FRECHET_METRICS:
                parts.setdefault(key, []).append(value)
    if not parts:
        raise UserError("no images to compute reference statistics from")
    return {key: FeatureStats.from_features(torch.cat(values)) for key, values in parts.items()}


def save_statistics(path: str | Path, stats: Mapping[str, FeatureStats], metadata: Mapping[str, Any]) -> Path:
    """Write statistics (and metadata, which must hold `backend_identity`) to a .safetensors file and a .json copy."""
    path = Path(path)
    if "backend_identity" not in metadata:
        raise UserError("reference metadata must name the backend_identity the statistics were computed with")
    tensors = {}
    for key, value in stats.items():
        tensors[f"{key}.mean"] = value.mean.double().contiguous()
        tensors[f"{key}.cov"] = value.cov.double().contiguous()
    record = {**metadata, "counts": {key: value.count for key, value in stats.items()}}
    text = json.dumps(record, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    pretty = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(pretty))
    return path


def load_statistics(path: str | Path) -> tuple[dict[str, FeatureStats], dict[str, Any]]:
    """(stats per metric, metadata) from a file of `save_statistics`, or from an .npz holding mu/sigma
    (pytorch-fid, clean-fid) and optionally mu_s/sigma_s (guided-diffusion's sFID), read without pickle."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics file {path} not found")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise UserError(f"{path} holds {sorted(data.keys())}; expected mu and sigma (and optionally mu_s, sigma_s)")
            stats = {"fid": _stats(data["mu"], data["sigma"])}
            if "mu_s" in data and "sigma_s" in data:
                stats["sfid"] = _stats(data["mu_s"], data["sigma_s"])
        return stats, {"backend_identity": None, "source": str(path), "format": "npz"}
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file: {err}") from err
    if METADATA_KEY not in header:
        raise UserError(f"{path} has no {METADATA_KEY!r} metadata: not dq reference statistics")
    metadata = json.loads(header[METADATA_KEY])
    counts = metadata.get("counts", {})
    stats = {}
    for key in FRECHET_METRICS:
        if f"{key}.mean" in tensors:
            stats[key] = FeatureStats(tensors[f"{key}.mean"], tensors[f"{key}.cov"], counts.get(key))
    return stats, metadata


def _stats(mu: np.ndarray, sigma: np.ndarray) -> FeatureStats:
    return FeatureStats(torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64), None)


def resolve_reference(spec: str, backend: FeatureBackend) -> tuple[dict[str, FeatureStats], dict[str, Any]]:
    """Reference statistics for `backend` from `spec` (eval.reference), and its protocol record.

    spec: "auto" (the digits backend's committed statistics of the real digits), "digits" (computed now
    from the real digits), "cleanfid:NAME/RES/SPLIT" (clean-fid's precomputed statistics, cleanfid backend),
    a statistics file (.safetensors of this module, or .npz with mu/sigma), or a folder of images.
    """
    spec = requested = str(spec)
    if spec == "auto":
        if backend.name != "digits":
            raise UserError(
                f"eval.reference=auto means the committed digit statistics, which fit the digits backend only; for "
                f"backend {backend.name!r} set eval.reference to an image folder, a statistics file "
                "(python -m dq.metrics.reference) or cleanfid:NAME/RES/SPLIT"
            )
        spec = str(DIGITS_REFERENCE_PATH)
    if spec.startswith("cleanfid:"):
        if not isinstance(backend, CleanFIDBackend):
            raise UserError(f"reference {spec!r} is clean-fid's statistics: use eval.backend=cleanfid")
        try:
            name, resolution, split = spec.removeprefix("cleanfid:").split("/")
            res = int(resolution)
        except ValueError as err:
            raise UserError(f"expected cleanfid:NAME/RES/SPLIT (e.g. cleanfid:cifar10/32/train), got {spec!r}") from err
        stats = {"fid": backend.dataset_statistics(name, res, split)}
        return stats, {"spec": spec, "source": f"clean-fid precomputed statistics {name} {res} {split}", "count": None}
    path = Path(spec).expanduser()
    if spec == DIGITS_SOURCE or path.is_dir():  # computed now, with this backend
        batches, description, count = reference_images(spec if spec == DIGITS_SOURCE else str(path), backend.batch_size)
        return compute_statistics(backend, batches), {"spec": spec, "source": description, "count": count}
    stats, metadata = load_statistics(path)
    identity = metadata.get("backend_identity")
    if identity is not None and identity != backend.identity():
        raise UserError(
            f"reference statistics {path} were computed with {identity!r}, but this evaluation's backend is "
            f"{backend.identity()!r}: FIDs across feature networks or preprocessing are not comparable"
        )
    record = {"spec": requested, "source": metadata.get("source", str(path)), "file": display_path(path),
              "sha256": file_sha256(path), "count": _count(stats)}
    if identity is None:
        record["note"] = "external statistics: the feature network they were made with is not recorded"
    return stats, record


def _count(stats: Mapping[str, FeatureStats]) -> int | None:
    return next(iter(stats.values())).count if stats else None


@cli.entry
def main(argv: list[str]) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="digits", help="digits | inception | cleanfid")
    parser.add_argument("--images", required=True, help="'digits' (the embedded model's training set) or a folder")
    parser.add_argument("--out", type=Path, required=True, help="statistics file to write (.safetensors)")
    parser.add_argument("--inception-path", default=None, help="TorchScript Inception file (inception, cleanfid)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    backend = build_backend(args.backend, inception_path=args.inception_path, batch_size=args.batch_size,
                            device=args.device, progress=True)
    batches, source, _ = reference_images(args.images, args.batch_size)
    stats = compute_statistics(backend, batches)
    metadata = {"backend_identity": backend.identity(), "backend": backend.describe(), "source": source,
                "dq_version": dq.__version__, "torch_version": torch.__version__}
    save_statistics(args.out, stats, metadata)
    dims = ", ".join(f"{key} {value.dim}-d" for key, value in stats.items())
    print(f"{_count(stats)} images, {dims}, {time.perf_counter() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()

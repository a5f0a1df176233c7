"""The digit classifier whose features give the embedded model's domain FID, sFID and IS analogue.

    python -m dq.metrics.digit_classifier --out dq/metrics/assets/digit_classifier.safetensors   # ~1 min, 1 core

Inception features mean little for 16x16 grey digits (they are upsampled 18x and fed to a network trained
on photographs), so dq trains a small CNN on the embedded model's own training set and uses its
penultimate activations instead (the approach of "domain FID" papers for MNIST-scale data). The recipe
holds out a stratified 20% validation split; the shipped weights are the ones whose validation accuracy
is recorded in their metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dq
from dq import cli
from dq.data import DIGITS_SIZE, load_digit_images
from dq.errors import MissingFileError, UserError
from dq.io import atomic_write

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CLASSIFIER_PATH = ASSETS_DIR / "digit_classifier.safetensors"
FORMAT_NAME = "dq-digit-classifier"
FEATURE_DIM = 64
SPATIAL_CHANNELS = 4  # sFID analogue: the first channels of a mid-level map, as sFID takes 7 of mixed_6


class DigitClassifier(nn.Module):
    """CNN on images [N, 1, 16, 16] in [-1, 1]: two conv stages (16 -> 8 -> 4), a 64-d hidden layer, 10 logits
    (about 94k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.stage2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] for images [N, 1, 16, 16] in [-1, 1]."""
        return self.head(self.dropout(F.relu(self.hidden(self.stage2(self.stage1(images))))))

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """For images [N, 1, 16, 16] in [-1, 1]: "features" [N, 64] (the penultimate layer before its ReLU,
        which zeroes about half of the units for every digit), "spatial" [N, 4 * 8 * 8] (the first channels
        of the stage-1 map) and "probs" [N, 10]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, DIGITS_SIZE, DIGITS_SIZE):
            raise UserError(f"the digit classifier takes images [N, 1, 16, 16], got {tuple(images.shape)}")
        stage1 = self.stage1(images)
        features = self.hidden(self.stage2(stage1))
        return {
            "features": features,
            "spatial": stage1[:, :SPATIAL_CHANNELS].flatten(1),
            "probs": self.head(F.relu(features)).softmax(dim=1),
        }


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), int64: `val_fraction` of every class held out, drawn with `seed`."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = max(1, round(len(members) * val_fraction))
        val.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _shift(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image translated by up to `max_shift` pixels (background-padded): the samples of a generative
    model are not centred exactly like the training digits, and the features should not care."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(dim=1) == labels).float().mean())


def train_classifier(
    epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, val_fraction: float = 0.2, max_shift: int = 1,
    seed: int = 0,
) -> tuple[DigitClassifier, dict]:
    """Train on the real digits (train split) with Adam and cosine decay; return the model and its record."""
    torch.manual_seed(seed)
    images, labels = load_digit_images(DIGITS_SIZE)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            loss = F.cross_entropy(model(_shift(images[batch], generator, max_shift)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, "
                  f"val accuracy {accuracy(model, images[val_idx], labels[val_idx]):.4f}")
    model.eval()
    record = {
        "format": FORMAT_NAME,
        "dq_version": dq.__version__,
        "torch_version": torch.__version__,
        "data": f"scikit-learn load_digits, {len(labels)} real digits upsampled to {DIGITS_SIZE}x{DIGITS_SIZE} "
                "by dq.data.load_digit_images",
        "recipe": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "val_fraction": val_fraction,
                   "max_shift": max_shift, "seed": seed, "optimizer": "Adam, cosine decay"},
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        "train_accuracy": round(accuracy(model, images[train_idx], labels[train_idx]), 4),
        "val_accuracy": round(accuracy(model, images[val_idx], labels[val_idx]), 4),
        "train_seconds": round(time.perf_counter() - start, 1),
        "feature_dim": FEATURE_DIM,
    }
    return model, record


def save_classifier(model: DigitClassifier, record: dict, path: Path) -> None:
    """Weights as safetensors with the training record in the header, and the record as `<path>.json`."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"dq_digit_classifier": json.dumps(record)}))
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))


def load_classifier(path: str | Path = CLASSIFIER_PATH) -> tuple[DigitClassifier, dict]:
    """(model in eval mode, training record) from a file written by `save_classifier`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"digit classifier {path} not found; train it with: python -m dq.metrics.digit_classifier --out {path}"
        )
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    record = json.loads(metadata.get("dq_digit_classifier", "{}"))
    if record.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a dq digit classifier (format {record.get('format')!r}, expected {FORMAT_NAME!r})")
    model = DigitClassifier()
    model.load_state_dict(tensors)
    return model.eval(), record


@cli.entry
def main(argv: list[str]) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, record = train_classifier(epochs=args.epochs, seed=args.seed)
    save_classifier(model, record, args.out)
    print(f"val accuracy {record['val_accuracy']:.4f} ({record['num_val']} held-out digits), train accuracy "
          f"{record['train_accuracy']:.4f}, {record['train_seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

"""Where a block's cache lives while its block trains: the GPU, host memory, or memory-mapped files on disk
(docs/memory.md). A cache is allocated once, whole, in its tier, and each capture chunk is copied into its
rows as it is made: the host never holds the chunks and their join side by side.

    allocate = tier_allocator("disk", device, directory)      # "cuda" | "cpu" | "disk"
    filler = BlockIOFiller(first_chunk, num_rows, allocate)   # then filler.add(chunk, start) for the rest
    cache = filler.result()

A disk tensor is a CPU tensor mapped from a file under `directory` that is unlinked as soon as it is mapped:
it takes no host memory the kernel cannot page out, reads like any CPU tensor, and leaves nothing behind
when the process ends, however it ends.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from dq.bkd.blocks import BlockIO
from dq.errors import UserError

TIERS = ("cuda", "cpu", "disk")
Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
_counter = itertools.count()


def tier_allocator(tier: str, device: torch.device | str, directory: str | Path | None) -> Allocator:
    """A function (shape, dtype) -> an uninitialised tensor in `tier`: on `device` (a CUDA device) for
    "cuda", in host memory for "cpu", mapped from an unlinked file under `directory` for "disk"."""
    if tier == "cuda":
        return lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)
    if tier == "cpu":
        return lambda shape, dtype: torch.empty(shape, dtype=dtype)
    if tier != "disk":
        raise UserError(f"a cache tier is one of {TIERS}, got {tier!r}")
    root = Path(directory or default_directory())

    def on_disk(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(int(size) for size in shape)
        path = root / f"dq-cache-{os.getpid()}-{next(_counter)}.bin"
        try:
            root.mkdir(parents=True, exist_ok=True)
            tensor = torch.from_file(str(path), shared=True, size=max(numel, 1), dtype=dtype)
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot map a block cache file under {root} ({err}); set method.distill.cache_dir "
                            "to a writable folder with room") from err
        finally:
            path.unlink(missing_ok=True)  # mapped: the file lives until the tensor is freed
        return tensor[:numel].view(shape)

    return on_disk


def default_directory() -> Path:
    """Where disk-tier caches go when method.distill.cache_dir is null: $DQ_CACHE_DIR/blocks (.cache/dq)."""
    return Path(os.environ.get("DQ_CACHE_DIR", ".cache/dq")) / "blocks"


def _rows_of(io: BlockIO) -> int:
    for i, leaf in enumerate(io.leaves):
        if isinstance(leaf, torch.Tensor) and i not in io.shared and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise UserError("a block capture has no batched tensor input")


class BlockIOFiller:
    """The BlockIO of `num_rows` calibration rows, allocated whole from the first chunk's shapes and filled
    chunk by chunk (`add`), in order. Checks what joining the chunks must keep: shared (unbatched) inputs and
    constants equal in every chunk, except an int that is each chunk's row count (PixArt's batch_size)."""

    def __init__(self, first: BlockIO, num_rows: int, allocate: Allocator, dtype: torch.dtype | None = None) -> None:
        """dtype: the dtype the batched floating-point inputs are stored in (None: as captured); the cache
        gives the block its inputs back in their captured dtype (BlockIO.dtypes)."""
        self.first, self.num_rows, self.rows = first, num_rows, _rows_of(first)
        self.leaves: list = []
        self.dtypes: dict[int, torch.dtype] = {}
        for i, leaf in enumerate(first.leaves):
            if isinstance(leaf, torch.Tensor) and i not in first.shared:
                if dtype is not None and leaf.is_floating_point() and leaf.dtype != dtype:
                    self.dtypes[i] = leaf.dtype
                self.leaves.append(self._fill(allocate, leaf, dtype if i in self.dtypes else None))
            elif isinstance(leaf, torch.Tensor):  # one copy for every row, as captured
                self.leaves.append(leaf.detach())
            else:
                self.leaves.append(leaf)
        self.output = None if first.output is None else [self._fill(allocate, t) for t in first.output]
        self.filled = self.rows

    def _fill(self, allocate: Allocator, chunk: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # contiguous whatever the chunk's layout: attention outputs come back channels-last, and PyTorch's CPU
        # GroupNorm backward crashes on channels-last inputs taken from such a cache (seen with torch 2.13)
        full = allocate((self.num_rows, *chunk.shape[1:]), dtype or chunk.dtype)
        full[: chunk.shape[0]].copy_(chunk.detach())
        return full

    def add(self, part: BlockIO) -> None:
        """Copy the next chunk into its rows."""
        rows, start = _rows_of(part), self.filled
        for i, (leaf, full) in enumerate(zip(part.leaves, self.leaves, strict=True)):
            if i in self.first.shared:
                if not torch.equal(leaf.cpu(), full.cpu()):
                    raise UserError(f"a shared (unbatched) input of the block changes between batches: leaf {i}")
            elif isinstance(leaf, torch.Tensor):
                full[start : start + rows].copy_(leaf.detach())
            elif leaf != full and not (isinstance(full, int) and full == self.rows and leaf == rows):
                raise UserError(f"a non-tensor input of the block changes between batches: {full!r}")
        if part.output is not None and self.output is not None:
            for chunk, full in zip(part.output, self.output, strict=True):
                full[start : start + rows].copy_(chunk.detach())
        self.filled += rows

    def result(self) -> BlockIO:
        if self.filled != self.num_rows:
            raise RuntimeError(f"a block cache of {self.num_rows} rows was filled with {self.filled}")
        return BlockIO(self.leaves, self.first.spec, self.output, self.first.shared, self.first.layouts, self.dtypes)

"""BKD's memory is bounded by one block: on a chain of identical transformer blocks, the peak of what training
allocates (caches, carried-forward outputs, activations, gradients, Adam's state) is the same at depth 2, 4
and 8. The models themselves are built before the count starts: they grow with depth by definition."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DiTTransformer2DModel

from dq.bkd import BlockDistiller, DistillConfig
from dq.bkd.distiller import training_blocks
from dq.plan import _Peak
from dq.quant import QuantConfig

T, N = 4, 32


def _chain(depth: int) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                                 num_layers=depth, sample_size=8, patch_size=2, num_embeds_ada_norm=11).eval()


def _calibration() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    step = torch.arange(N) % T
    return {"x_t": torch.randn(N, 1, 8, 8, generator=g), "timestep": step * 200 + 10, "step": step,
            "cond": torch.randint(10, (N,), generator=g)}


def _peak_of_bkd(depth: int, **distill) -> int:
    distiller = BlockDistiller(_chain(depth), QuantConfig(num_steps=T, num_groups=T),
                               DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, **distill),
                               _calibration(), seed=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=len(training_blocks(distiller.student, distiller.distill)),
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    tracker = _Peak()
    with tracker:
        trainer.fit(distiller)
    assert distiller.state.block == len(distiller.blocks)  # every block trained
    return tracker.bytes


@pytest.mark.slow
def test_the_peak_of_bkd_does_not_grow_with_depth():
    # the teacher's targets one block a pass (target_cache_mb bounds them otherwise); no end-to-end stage,
    # whose memory is the whole model's by definition
    distill = {"target_cache_mb": 0, "end_to_end_iters": 0}
    peaks = {depth: _peak_of_bkd(depth, **distill) for depth in (2, 4, 8)}
    assert max(peaks.values()) <= 1.1 * min(peaks.values()), peaks

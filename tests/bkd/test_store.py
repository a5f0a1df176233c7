"""Block caches in their tier (dq.bkd.store): filled chunk by chunk in place of joining the chunks, on the
host or memory-mapped from unlinked files on disk; a student trained from disk caches is bitwise the one
trained from host caches, and the plan's tiers are the ones BKD uses."""

import lightning as L
import pytest
import torch

from dq.bkd import BlockDistiller, DistillConfig
from dq.bkd.blocks import capture_block
from dq.bkd.store import BlockIOFiller, tier_allocator
from dq.errors import UserError
from dq.quant import QuantConfig
from tests.quant.conftest import tiny_unet2d

T, N = 4, 40  # N is not a multiple of the capture batch


def _calibration() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    step = torch.arange(N) % T
    return {"x_t": torch.randn(N, 3, 8, 8, generator=g), "step": step,
            "timestep": torch.tensor([900, 600, 300, 50])[step]}


def _fit(cache_dir, **distill) -> BlockDistiller:
    """A distiller of the tiny UNet (not trained yet) whose disk caches go under `cache_dir`."""
    config = DistillConfig(iters_per_block=3, batch_size=8, capture_batch_size=16, end_to_end_iters=2,
                           cache_dir=str(cache_dir), **distill)
    return BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), config, _calibration(), seed=3)


def _train(distiller: BlockDistiller) -> None:
    from dq.bkd import training_blocks

    epochs = len(training_blocks(distiller.student, distiller.distill))
    L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, reload_dataloaders_every_n_epochs=1).fit(distiller)


def test_disk_caches_train_the_same_student_as_host_caches(tmp_path):
    host, disk = _fit(tmp_path / "unused"), _fit(tmp_path / "blocks", cache_device="disk")
    _train(host)
    _train(disk)
    want, got = host.student.state_dict(), disk.student.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert host.state.final_losses == disk.state.final_losses
    assert set(disk.cache_devices.values()) == {"cpu"}  # disk tensors are CPU tensors
    assert list((tmp_path / "blocks").iterdir()) == []  # every file unlinked once mapped


def test_planned_tiers_place_each_cache(tmp_path):
    distiller = _fit(tmp_path / "blocks")
    distiller.setup("fit")
    names = distiller.blocks
    distiller.planned_tiers = {names[0]: "disk", names[1]: "cpu"}
    for k in range(2):
        distiller.begin_block(k)
        leaf = next(t for t in distiller.cache.leaves if isinstance(t, torch.Tensor))
        # a mapped file's storage is not resizable memory of the CPU allocator: how the two tiers differ
        assert (distiller.cache_tier(names[k]), leaf.untyped_storage().resizable()) == \
            (("disk", False) if k == 0 else ("cpu", True))
        distiller.end_block()


def test_the_filler_joins_chunks_as_torch_cat_and_checks_what_must_not_change(tmp_path):
    model = tiny_unet2d().eval()
    data = _calibration()
    batch = lambda rows: {k: v[rows] for k, v in data.items()}  # noqa: E731
    chunks = [capture_block(model, "down_blocks.0.resnets.0", batch(slice(s, s + 16)), want_output=True)
              for s in range(0, N, 16)]
    for tier in ("cpu", "disk"):
        filler = BlockIOFiller(chunks[0], N, tier_allocator(tier, "cpu", tmp_path))
        for chunk in chunks[1:]:
            filler.add(chunk)
        joined = filler.result()
        for i, leaf in enumerate(joined.leaves):
            if isinstance(leaf, torch.Tensor):
                assert leaf.is_contiguous()
                assert torch.equal(leaf, torch.cat([c.leaves[i] for c in chunks]))
        assert torch.equal(joined.output[0], torch.cat([c.output[0] for c in chunks]))
    short = BlockIOFiller(chunks[0], N, tier_allocator("cpu", "cpu", None))
    with pytest.raises(RuntimeError, match="filled with 16"):
        short.result()
    with pytest.raises(UserError, match="a cache tier is one of"):
        tier_allocator("tape", "cpu", None)


def test_end_to_end_recompute_trains_the_same_student(tmp_path):
    """The end-to-end stage with every block recomputed in backward gives bitwise the student of the plain
    stage (the TPQ steps of each block's forward are restored for its rerun)."""
    plain, recomputed = _fit(tmp_path), _fit(tmp_path, end_to_end_recompute=True)
    _train(plain)
    _train(recomputed)
    want, got = plain.student.state_dict(), recomputed.student.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert plain.state.final_losses == recomputed.state.final_losses
    with pytest.raises(UserError, match="end_to_end_recompute reruns each block"):
        DistillConfig(end_to_end_recompute=True, act_drop=0.5)


def test_planned_end_to_end_memory_falls_with_recompute():
    from diffusers import UNet2DModel

    from dq.plan import GIB, PlanSpec, make_plan

    with torch.device("meta"):
        model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
                            down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",), norm_num_groups=8)
    spec = PlanSpec(num_samples=64, num_trajectories=16, generation_batch_size=8, num_steps=T, guidance=False,
                    cond_shape=None, device="cuda", gpu_bytes=GIB)
    quant = QuantConfig(num_steps=T, num_groups=T)
    peaks = {}
    for recompute in (False, True):
        distill = DistillConfig(iters_per_block=2, end_to_end_iters=2, batch_size=16, end_to_end_recompute=recompute)
        peaks[recompute] = make_plan(model, quant, distill, spec).gpu["end_to_end"]
    assert peaks[True] < 0.6 * peaks[False]

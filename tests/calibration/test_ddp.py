"""Two gloo processes generate the calibration tuples together; the result equals one process's."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dq.calibration import CalibrationDataModule, load_tuples
from dq.sampling import SamplerConfig
from tests.conftest import make_tiny_unet

DDIM_5 = SamplerConfig(name="ddim", num_steps=5, eta=0.0, spacing="quad")


def _datamodule(cache_dir):
    from diffusers import DDPMScheduler

    return CalibrationDataModule(make_tiny_unet(), DDPMScheduler().config, DDIM_5, num_samples=40, num_trajectories=12,
                                 generation_batch_size=4, cache_dir=cache_dir, progress=False)


def _worker(rank, world_size, init_file, cache_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dm = _datamodule(cache_dir)
        dm.setup("fit")
        torch.save({k: v.clone() for k, v in dm.tuples.items()}, os.path.join(cache_dir, f"seen-by-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_shard_generation_and_agree_with_one(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(ddp_dir)), nprocs=2, join=True)
    single = _datamodule(single_dir)
    single.setup()
    cache_files = list(ddp_dir.glob("calibration-*.safetensors"))
    assert [p.name for p in cache_files] == [single.cache_path().name]  # shards merged and removed
    merged, _ = load_tuples(cache_files[0])
    for rank in range(2):
        seen = torch.load(ddp_dir / f"seen-by-rank{rank}.pt", weights_only=True)
        for key, tensor in merged.items():
            assert torch.equal(seen[key], tensor)
    for key, tensor in single.tuples.items():
        torch.testing.assert_close(merged[key], tensor, atol=1e-4, rtol=1e-4)

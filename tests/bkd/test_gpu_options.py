"""The GPU-scale options of BKD, checked on the CPU: bf16 teacher targets, the placement of the block cache
("auto" and its fitting rule, as a pure function) and torch.compile of the block being trained."""

import lightning as L
import pytest
import torch
from torch import nn

from dq.bkd import (
    BlockDistiller,
    DistillConfig,
    TPQRangeLogger,
    candidate_blocks,
    choose_cache_device,
)
from dq.quant import QuantConfig
from tests.bkd.test_distiller import T, _calibration
from tests.quant.conftest import tiny_unet2d

MiB = 2**20


def _distiller(iters: int = 3, **distill) -> BlockDistiller:
    config = DistillConfig(iters_per_block=iters, batch_size=8, capture_batch_size=16, end_to_end_iters=0, **distill)
    return BlockDistiller(
        tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), config, _calibration(), seed=3
    )


def _prepare_block(distiller: BlockDistiller, k: int) -> None:
    """Set the distiller up and run the initialisation of blocks 0..k-1, then prepare block k."""
    distiller.setup("fit")
    for j in range(k):
        distiller.begin_block(j)
        distiller.end_block()
    distiller.begin_block(k)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"teacher_precision": "fp16"}, "teacher_precision must be one of fp32, bf16"),
        ({"teacher_precision": "bfloat16"}, "teacher_precision"),
        ({"cache_device": "gpu"}, "cache_device must be 'cpu', 'auto', 'disk', 'cuda' or 'cuda:N'"),
        ({"cache_device": "cuda:"}, "cache_device"),
        ({"cache_device": "auto:0"}, "cache_device"),
        ({"cache_gpu_fraction": 0.0}, r"cache_gpu_fraction must lie in \(0, 1\]"),
        ({"cache_gpu_fraction": 1.5}, "cache_gpu_fraction"),
    ],
)
def test_bad_gpu_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**settings)


def test_good_gpu_settings_are_accepted():
    for device in ("cpu", "auto", "cuda", "cuda:1"):
        assert DistillConfig(cache_device=device).cache_device == device
    assert DistillConfig(cache_gpu_fraction=1.0, teacher_precision="bf16").teacher_precision == "bf16"


def test_bf16_teacher_targets_are_fp32_close_to_the_fp32_ones_and_the_student_inputs_unchanged():
    k = 4  # down_blocks.1.resnets.0: convolutions, GroupNorm, SiLU and a skip on the teacher's path
    reference, bf16 = _distiller(), _distiller(teacher_precision="bf16")
    _prepare_block(reference, k)
    _prepare_block(bf16, k)
    (target,), (rounded,) = reference.cache.output, bf16.cache.output
    assert rounded.dtype == torch.float32 and rounded.shape == target.shape
    assert not torch.equal(rounded, target)  # autocast was active on the teacher
    assert float((rounded - target).norm() / target.norm()) < 2e-2
    # the student's inputs are captured without autocast: bit-identical to the fp32 run's
    for fp32_leaf, bf16_leaf in zip(reference.cache.leaves, bf16.cache.leaves):
        if isinstance(fp32_leaf, torch.Tensor):
            assert bf16_leaf.dtype == torch.float32
            assert torch.equal(fp32_leaf, bf16_leaf)


def test_a_bf16_teacher_is_stored_in_bf16_with_the_same_targets_and_restored(monkeypatch):
    from torch import nn

    def teacher_bytes(distiller):
        return sum(p.numel() * p.element_size() for p in distiller.teacher.parameters())

    k = 4
    stored = _distiller(teacher_precision="bf16")
    fp32_bytes = teacher_bytes(stored)
    _prepare_block(stored, k)
    layers = [m for m in stored.teacher.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    assert teacher_bytes(stored) < 0.6 * fp32_bytes  # the weights are almost all Linear / conv weights
    with monkeypatch.context() as m:  # the same run with fp32 weights under the same autocast
        m.setattr(BlockDistiller, "store_teacher_in_bf16", lambda self: None)
        autocast_only = _distiller(teacher_precision="bf16")
        _prepare_block(autocast_only, k)
    assert all(map(torch.equal, stored.cache.output, autocast_only.cache.output))  # bitwise
    stored.teardown("fit")  # what Lightning calls when fit ends, however it ends
    assert teacher_bytes(stored) == fp32_bytes
    want = dict(autocast_only.teacher.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in stored.teacher.named_parameters())


def test_auto_cache_stays_on_the_cpu_without_a_gpu():
    distiller = _distiller()
    assert distiller.distill.cache_device == "auto"  # the default
    _prepare_block(distiller, 2)
    name = distiller.blocks[2]
    assert distiller.cache.device == torch.device("cpu") and distiller.cache_devices[name] == "cpu"
    assert distiller.cache_device_for(1) == torch.device("cpu")
    expected = sum(t.numel() * t.element_size() for t in distiller.cache.tensors())
    assert distiller.cache.nbytes == expected > 0
    # batch rows are indexed on the device the cache was actually placed on, whatever the setting says
    distiller.cache = distiller.cache.to("meta")
    assert distiller._device_rows(torch.tensor([0, 1])).device.type == "meta"


def test_auto_cache_goes_to_the_gpu_only_when_it_fits():
    gpu = torch.device("cuda", 1)
    assert choose_cache_device(100 * MiB, gpu, free_bytes=1000 * MiB, fraction=0.5) == gpu
    assert (
        choose_cache_device(500 * MiB, gpu, free_bytes=1000 * MiB, fraction=0.5) == gpu
    )  # exactly the share
    assert choose_cache_device(501 * MiB, gpu, free_bytes=1000 * MiB, fraction=0.5) == torch.device("cpu")
    assert choose_cache_device(900 * MiB, "cuda:0", free_bytes=1000 * MiB, fraction=1.0) == torch.device(
        "cuda:0"
    )
    # never a GPU for a module on the CPU, however much room there is
    assert choose_cache_device(1, "cpu", free_bytes=1000 * MiB, fraction=1.0) == torch.device("cpu")


class _Record(L.Callback):
    """Each iteration's loss, and the module's state_dict keys and compiled wrapper while a block trains."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.keys: list[str] = []
        self.compiled: list[nn.Module | None] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(pl_module._losses[-1])
        self.keys = list(pl_module.state_dict())
        self.compiled.append(pl_module._compiled.get(pl_module.blocks[pl_module.state.block]))


def _train(distiller: BlockDistiller, blocks: int) -> _Record:
    record = _Record()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=len(candidate_blocks(distiller.student)),
        max_steps=distiller.distill.iters_per_block * blocks,
        callbacks=[TPQRangeLogger(), record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(distiller)
    return record


def test_compiled_block_trains_like_the_eager_one_and_keeps_the_state_dict_keys():
    iters, blocks = 3, 3  # time_embedding, conv_in and a ResnetBlock2D
    eager = _distiller(iters)
    eager_run = _train(eager, blocks)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = _distiller(iters, compile=True, compile_backend="aot_eager")
    compiled_run = _train(compiled, blocks)

    assert len(compiled_run.losses) == len(eager_run.losses) == iters * blocks
    torch.testing.assert_close(compiled_run.losses, eager_run.losses, rtol=1e-4, atol=0.0)
    # the compiled wrapper was in use, one graph per block (no graph breaks), kept out of the module tree
    assert all(isinstance(c, torch._dynamo.eval_frame.OptimizedModule) for c in compiled_run.compiled)
    assert all(c is None for c in eager_run.compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == blocks
    assert compiled_run.keys == eager_run.keys
    assert list(compiled.student.state_dict()) == list(eager.student.state_dict())
    assert not any("_orig_mod" in key or "_compiled" in key for key in compiled.state_dict())
    for key, value in eager.student.state_dict().items():
        torch.testing.assert_close(compiled.student.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key)

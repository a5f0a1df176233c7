"""Shared fixtures: tiny randomly initialised diffusers models (built from config, no network) and the
offline settings every test runs under."""

import ast
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

# the triton integer backend's kernels run on CPU tensors in Triton's interpreter, which must be chosen before
# triton is first imported (its own functions are built for the interpreter or the compiler), and importing
# torch imports triton: so here, before torch, and only where there is no GPU to compile them for
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup would retry for ~30 s before failing
# the configs' caches (calibration tuples, encoded prompts) default under DQ_CACHE_DIR: never the checkout's
os.environ.setdefault("DQ_CACHE_DIR", tempfile.mkdtemp(prefix="dq-test-cache-"))
# under pytest-xdist (pyproject's addopts: one worker per core) each worker and the scripts it starts get their
# share of the cores: two workers of two threads each on two cores would oversubscribe them many times over
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # macOS: none
    _threads = max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = Path(__file__).resolve().parents[1]
TRAINING_FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb")


def frameworks_imported_by(code: str) -> list[str]:
    """Run `code` in a fresh Python process (at the repository root) and return which of the training
    frameworks it imported; fails the test with the process's stderr when the code itself fails."""
    probe = (f"\nimport sys\nprint('IMPORTED', sorted({{n.split('.')[0] for n in sys.modules}} & "
             f"{set(TRAINING_FRAMEWORKS)!r}))\n")
    out = subprocess.run([sys.executable, "-c", code + probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = [row for row in out.stdout.splitlines() if row.startswith("IMPORTED")][-1]
    return ast.literal_eval(line.removeprefix("IMPORTED "))


def make_tiny_unet(
    seed: int = 0,
    num_class_embeds: int | None = None,
    channels: int = 1,
    widths: tuple[int, int] = (8, 16),
    groups: int = 4,
    head_dim: int | None = None,
) -> UNet2DModel:
    """8x8 UNet2DModel with attention (the embedded model's block types at toy width)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=groups,
        attention_head_dim=head_dim,
        num_class_embeds=num_class_embeds,
    ).eval()


def make_tiny_text_unet(
    seed: int = 0,
    channels: int = 2,
    widths: tuple[int, int] = (8, 16),
    groups: int = 4,
    cross_attention_dim: int = 6,
    head_dim: int = 4,
) -> UNet2DConditionModel:
    """Cross-attention UNet (Stable Diffusion block types) on 8x8 latents."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=head_dim,
    ).eval()


def write_model_folder(unet, root):
    """A diffusers model folder (unet/ + a DDPM scheduler/, as save_pretrained writes them) at `root`."""
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000, clip_sample=True).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """A test (or a script's main it calls in-process) that leaves autograd off breaks whichever test runs next
    in the same worker: name the culprit instead."""
    yield
    left_on = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert left_on, "this test left autograd disabled (torch.set_grad_enabled(False) without restoring it)"


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    return make_tiny_unet()


@pytest.fixture
def tiny_class_unet() -> UNet2DModel:
    """Class-conditional (10 classes + a "null" class 10 for classifier-free guidance)."""
    return make_tiny_unet(num_class_embeds=11)


@pytest.fixture
def tiny_text_unet() -> UNet2DConditionModel:
    return make_tiny_text_unet()


@pytest.fixture
def ddpm_scheduler() -> DDPMScheduler:
    """The embedded model's training schedule (that of google/ddpm-cifar10-32)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)



def assert_replay_changes_nothing(make_model, quant_config, distill, data, trained, log_text: str) -> None:
    """Train a second student exactly like `trained` (a BlockDistiller whose fit has run with the default
    prefix replay; log_text: what its fit logged) with replay off: the two students must be bitwise the
    same, and no block may have fallen back from its stand-ins (the trace of which block reads which was
    complete for this architecture)."""
    import dataclasses

    import lightning as L

    from dq.bkd import BlockDistiller

    assert trained.distill.replay_cache_mb > 0 and trained.replay.shapes  # replay ran
    assert "forward-pass trace did not see" not in log_text
    plain = BlockDistiller(make_model(), quant_config, dataclasses.replace(distill, replay_cache_mb=0), data,
                           seed=trained.seed)
    L.Trainer(accelerator="cpu", max_epochs=len(trained.blocks), logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(plain)
    want, got = plain.student.state_dict(), trained.student.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# the ways Python code reads a tensor's value into a Python number: on CUDA each one waits for the device
HOST_READS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Inside the block, any Python read of a tensor's value (HOST_READS) raises AssertionError naming it.
    A read inside an ATen op (a 0-dim tensor used as an index) escapes this: run the forward on the meta
    device as well, where any read of a value raises."""

    def refusing(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside a forward that must not read values on the host")
        return read

    with contextlib.ExitStack() as stack:
        for name in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, refusing(name)))
        yield

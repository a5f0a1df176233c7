"""dq.placement: trainer=auto resolves to the GPU only when CUDA is present (announced in one line), trainer=gpu
without CUDA is refused, and phase records hold each phase's device, wall time and its own peak memory."""

import logging
import mmap
import time

import pytest
import torch

from dq import placement
from dq.errors import UserError


def test_auto_is_the_cpu_without_cuda_and_the_gpu_with_it(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="dq.placement"):
        settings = placement.trainer_settings({"accelerator": "auto", "devices": 1, "precision": "32-true"})
    assert settings == {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
    assert placement.job_device(settings) == torch.device("cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "dq.placement"]
    assert lines == ["device cpu (trainer accelerator auto; no CUDA device visible)"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement.resolve_accelerator("auto") == "gpu" and placement.resolve_accelerator("cuda") == "gpu"
    assert placement.resolve_accelerator("cpu") == "cpu"  # an explicit CPU stays the CPU


def test_gpu_without_cuda_and_unknown_accelerators_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="trainer.accelerator=gpu but no CUDA device is visible.*trainer=auto"):
        placement.resolve_accelerator("gpu")
    with pytest.raises(UserError, match="trainer.accelerator must be one of"):
        placement.resolve_accelerator("tpu")


def test_other_ranks_do_not_announce(monkeypatch, caplog):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with caplog.at_level(logging.INFO, logger="dq.placement"):
        placement.trainer_settings({"accelerator": "cpu"})
    assert not [r for r in caplog.records if r.name == "dq.placement"]


def test_phases_are_contiguous_and_each_peak_is_its_own():
    with placement.recording() as phases:
        placement.enter("small", "cpu")
        time.sleep(0.05)
        placement.enter("large", torch.device("cpu"))
        block = mmap.mmap(-1, 96 * 2**20)  # 96 MiB of fresh pages, touched: an allocator could reuse freed ones
        block.write(b"\1" * len(block))
        block.close()
        placement.finish()
        time.sleep(0.05)  # between phases: counted in none
        placement.enter("small", "cpu")  # entered again: times add up
        time.sleep(0.05)
    records = phases.summary()
    assert list(records) == ["small", "large"]
    assert records["small"]["device"] == "cpu" and records["small"]["seconds"] >= 0.1
    if records["large"]["memory_measure"] == "peak_rss":  # Linux: the peak is reset per phase
        assert records["large"]["peak_memory_mb"] - records["small"]["peak_memory_mb"] > 80  # the 96 MiB block
    placement.enter("outside", "cpu")  # no job is recorded: library use costs nothing
    assert "outside" not in phases.records


def test_a_phase_that_moved_device_shows_both():
    recorder = placement.PhaseRecorder()
    recorder.enter("sampling", "cpu")
    recorder.enter("sampling", "meta")
    recorder.finish()
    assert recorder.records["sampling"]["device"] == "cpu,meta"

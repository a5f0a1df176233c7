"""Where a job runs, and what each of its phases cost there: the device, the wall time, the peak memory.

    settings = trainer_settings(cfg.trainer)       # accelerator "auto" made explicit, the device announced
    with recording() as phases:                     # one per job (train, evaluate, export)
        enter("calibration", unet_device)           # from anywhere below: ends the last phase, starts this one
        ...
    results["phases"] = phases.summary()            # {name: {device, seconds, peak_memory_mb, ...}}

`trainer=auto` (the default) runs on the GPU when CUDA is present and on the CPU otherwise, announced in one
log line; `trainer=gpu` without CUDA is refused before any work.

Phases are contiguous segments of a job: entering one ends the last, so each peak is its own. A phase's
device is the device its tensors were on (the caller passes it), not the configured one, so that a phase
that fell back to the CPU shows. Peak memory is the CUDA allocator's `max_memory_allocated` (reset when the
phase starts) on a CUDA device, and the process's peak resident set size on the CPU, reset per phase through
/proc/self/clear_refs (Linux); where that file cannot be written, the process's peak so far, and the record
says so. A CUDA phase ends with a synchronize, so that its wall time includes its kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from dq.errors import UserError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
log = logging.getLogger("dq.placement")


def resolve_accelerator(accelerator: str) -> str:
    """"cpu" or "gpu" for a trainer.accelerator: auto is the GPU when CUDA is present; gpu without CUDA is
    a UserError (before any work)."""
    accelerator = str(accelerator)
    if accelerator not in ACCELERATORS:
        raise UserError(f"trainer.accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    if accelerator == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "gpu"
    if accelerator == "auto":
        return "cpu"
    raise UserError(f"trainer.accelerator={accelerator} but no CUDA device is visible (torch.cuda.is_available() "
                    "is False): use trainer=auto or trainer=cpu")


def trainer_settings(trainer: Mapping[str, Any], announce: bool = True) -> dict[str, Any]:
    """The trainer config with its accelerator made explicit (a Lightning Trainer / Fabric takes it as is);
    announces the device in one log line on the first process (DDP's other ranks stay quiet)."""
    settings = dict(trainer)
    requested = str(settings.get("accelerator", "auto"))
    settings["accelerator"] = resolve_accelerator(requested)
    if announce and os.environ.get("LOCAL_RANK", "0") == "0":
        log.info("%s", device_line(requested, settings["accelerator"], settings.get("devices", 1)))
    return settings


def device_line(requested: str, accelerator: str, devices: Any = 1) -> str:
    """The one-line announcement of where a job runs, e.g. `device cuda:0 (NVIDIA H200, 140 GiB; trainer
    accelerator auto)`; on the CPU it says whether a CUDA device was left unused."""
    count = f", {devices} processes" if isinstance(devices, int) and devices > 1 else ""
    if accelerator == "gpu":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (f"device cuda:{torch.cuda.current_device()} ({props.name}, {props.total_memory / 2**30:.0f} GiB; "
                f"trainer accelerator {requested}{count})")
    if torch.cuda.is_available():
        return (f"device cpu (trainer accelerator {requested}{count}; CUDA device "
                f"{torch.cuda.get_device_name()} left unused: trainer=auto runs there)")
    return f"device cpu (trainer accelerator {requested}{count}; no CUDA device visible)"


def job_device(settings: Mapping[str, Any]) -> torch.device:
    """The device of the first process of a job with these (resolved) trainer settings: the CPU, or the
    first of `devices` when it lists GPU indices, else the current CUDA device."""
    if settings["accelerator"] != "gpu":
        return torch.device("cpu")
    devices = settings.get("devices", 1)
    if isinstance(devices, (list, tuple)) and devices:
        return torch.device("cuda", int(devices[0]))
    return torch.device("cuda", torch.cuda.current_device())


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module without tensors)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ phase records

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_now_and_peak_mb() -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of this process in MiB, from /proc/self/status; None where it cannot be read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def _rss_peak_reset() -> bool:
    """Reset this process's peak RSS (Linux: 5 > /proc/self/clear_refs); False where that is not possible or
    the peak did not come down to the current RSS (a kernel that accepts the write and ignores it)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    now = _rss_now_and_peak_mb()
    return now is not None and now[1] - now[0] < 16  # MiB: the RSS may grow between the reset and the read


def _rss_peak_mb() -> float:
    """This process's peak RSS since the last reset (VmHWM), or since it started (getrusage)."""
    now = _rss_now_and_peak_mb()
    if now is not None:
        return now[1]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PhaseRecorder:
    """The records of one job's phases, in the order they ran; a phase entered again adds to its record."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self._current: tuple[str, torch.device, float, bool] | None = None

    def enter(self, name: str, device: torch.device | str) -> None:
        """End the current phase and start `name`, running on `device`."""
        self.finish()
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        per_phase = _rss_peak_reset()
        self._current = (name, device, time.perf_counter(), per_phase)

    def finish(self) -> None:
        """End the current phase (nothing when none runs)."""
        if self._current is None:
            return
        name, device, started, per_phase = self._current
        self._current = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak, measure = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
        else:
            peak, measure = _rss_peak_mb(), "peak_rss" if per_phase else "process_peak_rss"
        record = {"device": str(device), "seconds": time.perf_counter() - started, "peak_memory_mb": peak,
                  "memory_measure": measure, "peak_rss_mb": _rss_peak_mb()}
        old = self.records.get(name)
        if old is not None:  # re-entered (a resumed or repeated phase): times add up, peaks take the max
            record["seconds"] += old["seconds"]
            record["peak_memory_mb"] = max(peak, old["peak_memory_mb"])
            record["peak_rss_mb"] = max(record["peak_rss_mb"], old["peak_rss_mb"])
            if old["device"] != record["device"]:
                record["device"] = f"{old['device']},{record['device']}"
        self.records[name] = record

    def summary(self) -> dict[str, dict[str, Any]]:
        """The records as written to results.json / metrics.json (seconds to 0.01, megabytes to 0.1)."""
        return {name: {**r, "seconds": round(r["seconds"], 2), "peak_memory_mb": round(r["peak_memory_mb"], 1),
                       "peak_rss_mb": round(r["peak_rss_mb"], 1)} for name, r in self.records.items()}


_active: list[PhaseRecorder] = []


@contextlib.contextmanager
def recording(recorder: PhaseRecorder | None = None) -> Iterator[PhaseRecorder]:
    """Record the phases entered inside the block (`enter`) into `recorder` (a new one by default); the last
    phase ends with the block."""
    recorder = PhaseRecorder() if recorder is None else recorder
    _active.append(recorder)
    try:
        yield recorder
    finally:
        recorder.finish()
        _active.remove(recorder)


def enter(name: str, device: torch.device | str) -> None:
    """Start phase `name` on `device` in the job being recorded (nothing outside `recording`: library use)."""
    if _active:
        _active[-1].enter(name, device)


def finish() -> None:
    """End the current phase of the job being recorded, so that what follows counts in none."""
    if _active:
        _active[-1].finish()

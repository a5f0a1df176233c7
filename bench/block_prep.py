"""Where block preparation goes on the main job, with and without replaying the trained blocks' outputs in
the student's prefix passes (method.distill.replay_cache_mb), measured side by side in one process.

    python bench/block_prep.py                       # the main job's config (embedded UNet, W4A4, N = 5,120)
    python bench/block_prep.py quant=w6a6 model=embedded_dit data.num_samples=1024

For each setting it prepares every block as BKD does (cache, initialisation, replay recording; no training
iterations, so each block keeps its initialised quantizers) and prints the seconds of the student's prefix
passes, the teacher's target passes, the initialisation, the replay recording and their total, the peak
memory of the kept outputs, and a hash of every block's cached inputs and targets: the two settings must
print the same hashes. Extra arguments are Hydra overrides of conf/config.yaml.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq.bkd import distiller as distiller_module  # noqa: E402
from dq.bkd.blocks import WHOLE_MODEL  # noqa: E402
from dq.jobs import train  # noqa: E402


def cache_hash(cache) -> str:
    digest = hashlib.sha1()
    for tensor in cache.tensors():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def prepare_every_block(overrides: list[str], replay_cache_mb: float) -> dict:
    """Prepare every block of the run `overrides` describe, timing each part; returns the figures."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"output_dir={tempfile.mkdtemp()}", "progress_bar=false",
                                           f"method.distill.replay_cache_mb={replay_cache_mb}", *overrides])
    job = train.prepare(cfg, time.perf_counter())
    distiller = job.distiller
    seconds = {"student_prefix": 0.0, "teacher_targets": 0.0}
    capture = distiller_module.capture_block
    targets = distiller.teacher_targets

    def timed_capture(model, *args, **kwargs):
        started = time.perf_counter()
        try:
            return capture(model, *args, **kwargs)
        finally:  # the teacher's captures are timed inside teacher_targets
            if model is distiller.student:
                seconds["student_prefix"] += time.perf_counter() - started

    def timed_targets(name):
        started = time.perf_counter()
        try:
            return targets(name)
        finally:
            seconds["teacher_targets"] += time.perf_counter() - started

    distiller_module.capture_block, distiller.teacher_targets = timed_capture, timed_targets
    try:
        distiller.setup("fit")
        hashes, peak = [], 0
        started = time.perf_counter()
        for k, name in enumerate(distiller.blocks):
            if name == WHOLE_MODEL:  # the end-to-end stage: its cache is the model's own inputs
                continue
            distiller.begin_block(k)
            hashes.append(cache_hash(distiller.cache))
            peak = max(peak, distiller.replay.total_bytes + distiller.teacher_replay.total_bytes)
            distiller.end_block()
        total = time.perf_counter() - started
    finally:
        distiller_module.capture_block = capture
    return {
        "replay_cache_mb": replay_cache_mb,
        "blocks": len(hashes),
        "calibration_tuples": distiller.num_samples,
        "torch_threads": torch.get_num_threads(),
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()},
                    "initialisation": round(distiller.prep_seconds["init"], 1),
                    "replay_recording": round(distiller.prep_seconds["replay"], 1), "total": round(total, 1)},
        "replay_peak_mib": round(peak / 2**20, 1),
        "cache_hashes": hashes,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml")
    parser.add_argument("--replay-cache-mb", type=float, default=1024.0, help="the replay budget to compare with 0")
    args = parser.parse_args(argv)
    rows = [prepare_every_block(args.overrides, mb) for mb in (0.0, args.replay_cache_mb)]
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "cache_hashes"}))
    same = rows[0]["cache_hashes"] == rows[1]["cache_hashes"]
    print(f"caches bitwise the same with and without replay: {same}")
    print(f"student prefix passes: {rows[0]['seconds']['student_prefix']} s -> {rows[1]['seconds']['student_prefix']} s; "
          f"preparation: {rows[0]['seconds']['total']} s -> {rows[1]['seconds']['total']} s")
    if not same:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()

"""Sampling speed of the embedded model (or any model config) with its default sampler.

    python bench/bench_sampling.py                 # 64 samples, DDIM 25 steps, the embedded model
    python bench/bench_sampling.py --num 64 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq.sampling import sample  # noqa: E402
from dq.zoo import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", type=Path, default=Path(__file__).resolve().parents[1] / "conf/model/embedded.yaml")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    loaded = load_model(OmegaConf.load(args.model_config))
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sample(loaded.unet, loaded.scheduler.config, loaded.sampler, args.num, seed=0, batch_size=args.num, progress=False)
        seconds.append(time.perf_counter() - start)
    s = loaded.sampler
    print(f"bench_sampling: {args.num} samples, {s.name} {s.num_steps} steps ({s.spacing}), "
          f"CPU threads={torch.get_num_threads()}, torch={torch.__version__}: "
          f"best {min(seconds):.2f} s, median {sorted(seconds)[len(seconds) // 2]:.2f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()

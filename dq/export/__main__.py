"""Export a train.py run's student as an integer model (packed weight codes + per-step TPQ tables).

    python -m dq.export run=outputs/<date>/<time>_dilatequant_w4a4            # -> <run>/student_int.safetensors
                                                                              #    (and into <run>/student/)
    python -m dq.export run=DIR out=/tmp/w4a4.safetensors float_dtype=bfloat16 overwrite=true

Arguments (key=value): run (required), out (default <run>/student_int.safetensors), float_dtype (float16 |
bfloat16 | float32: the norms, biases and embeddings; default float32), overwrite (default false), verify
(default 32: that many samples from the same noise by the integer model, the fake-quant student and the FP
model, and the PSNR between them; 0 skips it), verify_seed (default 1234: the noise seed of that check),
device (default auto: the GPU when CUDA is present, else the CPU; where that check runs, the integer model
with the gemm kernels on a GPU). Prints the file's size against the FP32 denoiser, what takes the room, and
the check with its device, time and peak memory. Errors: one `dq: error:`
line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dq.cli import entry
from dq.export.artifact import FLOAT_DTYPES, ExportError, export_student, size_breakdown
from dq.io import check_writable_dir, file_sha256

KEYS = {"run": None, "out": None, "float_dtype": "float32", "overwrite": "false", "verify": "32", "verify_seed": "1234",
        "device": "auto"}


def parse_args(argv: list[str]) -> dict[str, str | None]:
    args = dict(KEYS)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ExportError(f"unknown argument {item!r}; use key=value with keys {sorted(KEYS)}")
        args[key] = value
    if not args["run"]:
        raise ExportError("run=<train.py output dir> is required")
    if args["float_dtype"] not in FLOAT_DTYPES:
        raise ExportError(f"float_dtype must be one of {sorted(FLOAT_DTYPES)}, got {args['float_dtype']!r}")
    if not str(args["verify"]).isdigit():
        raise ExportError(f"verify must be a number of samples >= 0, got {args['verify']!r}")
    if not str(args["verify_seed"]).isdigit():
        raise ExportError(f"verify_seed must be an int >= 0, got {args['verify_seed']!r}")
    if args["device"] not in ("auto", "cpu", "cuda"):
        raise ExportError(f"device must be auto, cpu or cuda, got {args['device']!r}")
    if args["overwrite"] not in ("true", "false"):
        raise ExportError(f"overwrite must be true or false, got {args['overwrite']!r}")
    return args


def export_run(run: str | Path, out: str | Path | None = None, float_dtype: str = "float32",
               overwrite: bool = False, verify: int = 32, verify_seed: int = 1234, device: str = "auto"
               ) -> tuple[Path, dict[str, Any]]:
    """Export the student of a complete train.py run dir; returns (path, summary with the size figures, and
    the check's figures and phase record: device, seconds, peak memory)."""
    from omegaconf import OmegaConf

    from dq.arch import describe
    from dq.quant import load_quant_state
    from dq.sampling import planned_timesteps
    from dq.zoo import load_model

    run_dir = Path(run).expanduser()
    if not run_dir.is_dir():
        raise ExportError(f"run={run_dir} does not exist or is not a directory")
    for name in ("config.yaml", "student.safetensors", "results.json"):
        if not (run_dir / name).is_file():
            raise ExportError(f"run={run_dir} is not a complete train.py run: {name} is missing")
    results = json.loads((run_dir / "results.json").read_text())
    if not results.get("complete"):
        raise ExportError(f"run={run_dir} did not complete (results.json has complete={results.get('complete')})")
    out_path = Path(out).expanduser() if out else run_dir / "student_int.safetensors"
    if out_path.exists() and not overwrite:
        raise ExportError(f"{out_path} exists; pass overwrite=true to replace it")
    check_writable_dir(out_path.parent, "out")  # before any work
    run_config = OmegaConf.load(run_dir / "config.yaml")
    loaded = load_model(run_config.model, prompt_limit=max(1, verify))  # the FP model + its conditioning
    try:
        student = load_quant_state(loaded.unet, run_dir / "student.safetensors", describe(loaded.unet))
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(f"cannot load the run's student: {err}") from err
    timesteps = planned_timesteps(loaded.scheduler.config, loaded.sampler).tolist()
    extra = {
        "model_config": OmegaConf.to_container(run_config.model, resolve=True),
        "sampler": loaded.sampler.to_dict(),
        "scheduler_config": {k: v for k, v in dict(loaded.scheduler.config).items() if not k.startswith("_")},
        "method": run_config.method.name, "quant": run_config.quant.name,
        "source": {"run_dir": str(run_dir), "student_sha256": file_sha256(run_dir / "student.safetensors")},
    }
    path = export_student(student, out_path, timesteps, float_dtype, extra)
    folder = run_dir / "student"
    if out is None and (folder / "dq_student.json").is_file():  # the run's student folder gets the export too
        from dq.pretrained import add_export

        add_export(folder, path)
    fp32_bytes = sum(t.numel() * 4 for t in loaded.unet.state_dict().values() if t.is_floating_point())
    summary = {"path": str(path), "bytes": path.stat().st_size, "fp32_unet_bytes": fp32_bytes,
               "breakdown": size_breakdown(path)}
    if verify:
        from dq.placement import job_device, recording, trainer_settings

        where = job_device(trainer_settings({"accelerator": "gpu" if device == "cuda" else device}, announce=False))
        with recording() as phases:
            summary["verify"] = verify_export(path, loaded, student, verify, verify_seed, where)
        summary["phases"] = phases.summary()
    return path, summary


def verify_export(path: Path, loaded, student, num_samples: int, seed: int = 1234,
                  device: torch.device | None = None) -> dict[str, float]:
    """Sample `num_samples` images from the same noise (and conditioning: sample k gets class / prompt k % P,
    as train.py's fidelity check does) with the integer model of `path`, the fake-quant student, the same
    student in float64 and the FP model; the PSNR of each pair. The float64 student measures how far the
    float32 fake-quant reference itself is from exact arithmetic: a low-bit student's trajectories amplify
    rounding differences, so no implementation that is not bit-identical to it can come closer than that.
    device: where every model samples (default the CPU; the integer model runs the gemm kernels on CUDA)."""
    import copy

    from dq.export.runtime import load_int_model
    from dq.metrics import psnr
    from dq.placement import enter
    from dq.sampling import sample
    from dq.zoo import to_images

    device = torch.device("cpu") if device is None else device
    int_model = load_int_model(path, device=device)
    student, fp_unet = student.to(device), loaded.unet.to(device)
    if loaded.components.vae is not None:
        loaded.components.vae.to(device)
    enter("verify", device)
    cond, uncond = loaded.conditioning.for_indices(torch.arange(num_samples))
    kwargs = dict(seed=seed, batch_size=min(num_samples, 32), progress=False, cond=cond, uncond=uncond)
    config = loaded.scheduler.config
    models = (("int", int_model), ("fake_quant", student), ("fake_quant_fp64", copy.deepcopy(student).double()),
              ("fp", fp_unet))
    images = {name: to_images(loaded.components, sample(model, config, loaded.sampler, num_samples, **kwargs).float())
              for name, model in models}
    pairs = (("int", "fake_quant"), ("int", "fp"), ("fake_quant", "fp"), ("fake_quant", "fake_quant_fp64"),
             ("int", "fake_quant_fp64"))
    return {"num_samples": num_samples, "seed": seed,
            **{f"psnr_{a}_vs_{b}": psnr(images[a], images[b]) for a, b in pairs}}


@entry
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    path, summary = export_run(args["run"], args["out"], args["float_dtype"], args["overwrite"] == "true",
                               int(args["verify"]), int(args["verify_seed"]), args["device"])
    ratio = summary["bytes"] / summary["fp32_unet_bytes"]
    print(f"dq: exported {path}: {summary['bytes'] / 1e6:.3f} MB, {ratio:.3f} of the FP32 denoiser "
          f"({summary['fp32_unet_bytes'] / 1e6:.3f} MB of float32 tensors)")
    for part, size in summary["breakdown"].items():
        print(f"dq:   {part:22s} {size / 1e3:10.1f} kB")
    check = summary.get("verify")
    if check:
        print(f"dq: {check['num_samples']} samples from the same noise (PSNR): integer vs fake-quant student "
              f"{check['psnr_int_vs_fake_quant']:.2f} dB; integer vs FP {check['psnr_int_vs_fp']:.2f} dB, "
              f"fake-quant vs FP {check['psnr_fake_quant_vs_fp']:.2f} dB; against the student in float64: "
              f"fake-quant (float32) {check['psnr_fake_quant_vs_fake_quant_fp64']:.2f} dB, integer "
              f"{check['psnr_int_vs_fake_quant_fp64']:.2f} dB")
        record = summary["phases"]["verify"]
        print(f"dq: the check ran on {record['device']}: {record['seconds']:.1f} s, peak memory "
              f"{record['peak_memory_mb']:.0f} MB ({record['memory_measure']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python train.py model=local model.path=<a pipeline folder as the hub repo has it>: a tiny SD 1.5 pipeline
saved with its UNet sharded, and the same saved as the fp16 files only (tests/zoo/real_layouts.py), each runs
end to end with text prompts and the sampler its pipeline runs (PLMS, guidance 7.5; 4 steps here); the run's
student then runs inside the stock StableDiffusionPipeline loaded from the same folder."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

import dq
from dq.jobs.train import train
from dq.quant.quantizers import StepIndexed
from dq.sampling import sample, sample_seed
from dq.zoo import load_model
from tests.train.conftest import compose_config, fast_overrides
from tests.zoo.real_layouts import PROMPTS, write_sd15

STEPS, SEED = 4, 21


@pytest.fixture(scope="module", params=["sharded", "fp16"])
def sd15_run(request, tmp_path_factory):
    """(the SD 1.5 folder, its variant, the train.py run dir, the run's composed config)."""
    root = tmp_path_factory.mktemp(request.param)
    variant = None if request.param == "sharded" else "fp16"
    folder = write_sd15(root / "sd15", variant=variant)
    cfg = compose_config([*fast_overrides(folder, root / "run", root / "cache"),
                          f"model.conditioning.prompts_file={folder / 'prompts.txt'}"])
    train(cfg)
    return folder, variant, root / "run", cfg


def test_train_runs_a_pipeline_folder_with_text_prompts(sd15_run):
    folder, _, run, _ = sd15_run
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] and results["num_steps"] == STEPS + 1  # PLMS: one model call more than steps
    assert results["sampler"] == {"name": "plms", "num_steps": STEPS, "eta": 0.0, "spacing": "uniform",
                                  "guidance_scale": 7.5}  # the folder's pipeline's, but the overridden step count
    assert results["fidelity_protocol"]["conditioning"]["num_prompts"] == len(PROMPTS)
    assert results["psnr_vs_fp"] > 10.0 and (run / "samples.png").is_file()
    student = dq.load_student(run / "student")
    assert type(student).__name__ == "UNet2DConditionModel"


def test_stock_pipeline_runs_the_student_of_the_run(sd15_run):
    folder, variant, run, cfg = sd15_run
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant=variant, dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(PROMPTS[:2])
    model = load_model(cfg.model, prompt_limit=len(prompts))
    cond, uncond = model.conditioning.for_indices(torch.arange(len(prompts)))

    def run_stock(unet, steps=STEPS):
        pipe_with = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
        pipe_with.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(sample_seed(SEED, k)) for k in range(len(prompts))]
        return pipe_with(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=generators,
                         output_type="latent").images

    def run_ours(unet):
        return sample(unet, model.scheduler.config, model.sampler, len(prompts), seed=SEED, cond=cond, uncond=uncond,
                      progress=False)

    # the FP UNet: the stock pipeline and dq's sampler run the same PLMS on the same noise and prompts
    fp = run_stock(model.unet)
    assert pipe.scheduler.timesteps.tolist() == [751, 501, 501, 251, 1]  # SD 1.5's PLMS, as dq trained it
    assert (fp - run_ours(model.unet)).abs().max() < 1e-4 * fp.abs().max()
    student = dq.load_student(run / "student")
    rows = []
    quantizer = next(m for m in student.modules() if isinstance(m, StepIndexed))
    quantizer.register_forward_pre_hook(lambda module, args: rows.append(module.step))
    latents = run_stock(student)
    # classifier-free guidance runs one doubled batch a step; PLMS's second call at 501 takes its first row
    # (a timestep keys its first step): dq's sampler gives it row 2
    assert rows == [0, 1, 1, 3, 4]
    ours = run_ours(student)
    assert latents.shape == ours.shape == (2, 2, 8, 8) and bool(torch.isfinite(latents).all())
    assert (latents - ours).abs().max() < (latents - fp).abs().max()  # nearer dq's student than the FP model
    with pytest.raises(ValueError, match=r"not in the schedule this student's TPQ tables were trained for"):
        run_stock(student, steps=STEPS + 2)

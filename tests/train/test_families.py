"""Every supported text-to-image family as a user has it: `python train.py model=<its config>
model.path=<the folder as the hub repo is saved>` with text prompts, on tiny random pipelines saved in the
real layouts (tests/zoo/real_layouts.py), runs end to end; the run's student folder reloads; the family's
stock diffusers pipeline, loaded from the same folder, gives dq's sampler's latents with the FP denoiser and
runs the student on its trained TPQ rows under `exact`, refuses another schedule, and runs it under
`nearest`.

Tolerances, FP denoiser, stock pipeline against dq's sampler on the same noise and prompts, as a share of
the latents' largest value: 1e-4 where both run the same integer timesteps (DDIM, PLMS, DPM-Solver;
measured at most 6.6e-6, SDXL); 2e-2 for the flow families, whose pipelines run the unrounded levels σ·1000
where dq's steps sit on the 1000-point grid (measured: SD3 1.4e-3, FLUX.1-dev 9.4e-4, Sana 8.1e-3).
"""

import json

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline

import dq
from dq.jobs.train import train
from dq.quant.quantizers import StepIndexed
from dq.sampling import sample, sample_seed
from dq.zoo import load_model
from tests.train.conftest import compose_config, fast_overrides
from tests.zoo.real_layouts import PIPELINE_KWARGS, PROMPTS, TOKEN_LENGTH, WRITERS

STEPS, SEED = 4, 21
# family: (model config, the stock pipeline's scheduler when dq samples another one, extra overrides)
FAMILIES = {
    "sd14": ("sd_v1_4", None, []),
    "sd15": ("sd_v1_5", None, []),
    "sd21": ("sd_v2_1", None, []),
    "sdxl": ("sdxl_base", DDIMScheduler, []),  # the repo's Euler; dq samples DDIM on its timesteps
    "pixart_sigma": ("pixart_sigma", None, [f"model.conditioning.max_sequence_length={TOKEN_LENGTH}"]),
    "sd3": ("sd3_medium", None, [f"model.conditioning.max_sequence_length={TOKEN_LENGTH}"]),
    "flux_schnell": ("flux_schnell", None, [f"model.conditioning.max_sequence_length={TOKEN_LENGTH}",
                                            "model.sample_size=8"]),
    "flux_dev": ("flux_dev", None, [f"model.conditioning.max_sequence_length={TOKEN_LENGTH}", "model.sample_size=8"]),
    "sana": ("sana_1600m", FlowMatchEulerDiscreteScheduler,  # the repo's flow DPM-Solver; dq samples flow Euler
             [f"model.conditioning.max_sequence_length={TOKEN_LENGTH}"]),
    # PixArt-α at 1024 px (resolution and aspect-ratio conditions), through model=local at 8x8 latents
    "pixart_alpha_1024": ("local", None, [f"model.conditioning.max_sequence_length={TOKEN_LENGTH}",
                                          "model.sample_size=8"]),
}
FLOW = ("sd3", "flux_schnell", "flux_dev", "sana")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory):
    """(family, its folder, the run dir, the run's composed config)."""
    family = request.param
    config, _, extra = FAMILIES[family]
    root = tmp_path_factory.mktemp(family)
    folder = WRITERS[family](root / family)
    overrides = [o for o in fast_overrides(folder, root / "run", root / "cache") if o != "model=local"]
    cfg = compose_config([f"model={config}", *overrides, f"model.conditioning.prompts_file={folder / 'prompts.txt'}",
                          *extra])
    train(cfg)
    return family, folder, root / "run", cfg


def test_train_runs_the_family_folder_with_text_prompts(family_run):
    family, folder, run, cfg = family_run
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] and (run / "samples.png").is_file()
    conditioning = results["fidelity_protocol"]["conditioning"]
    assert conditioning["num_prompts"] == len(PROMPTS)
    index = json.loads((folder / "model_index.json").read_text())
    assert conditioning["encoding"]["pipeline"] == index["_class_name"]
    assert results["psnr_vs_fp"] > 5.0
    student = dq.load_student(run / "student")
    denoiser = "unet" if "unet" in index else "transformer"
    assert type(student).__name__ == index[denoiser][1]


def test_pixart_alpha_conditions_are_the_pipelines(tmp_path):
    """PixArt-α 1024's call: the resolution and aspect ratio PixArtAlphaPipeline forms at its default size
    (the denoiser's sample size times the VAE's factor), packed with the T5 mask, reach the transformer."""
    from diffusers import PixArtAlphaPipeline

    from dq.arch.text_conditioning import unpack_for
    from dq.sampling import unet_forward

    folder = WRITERS["pixart_alpha_1024"](tmp_path / "alpha")
    cfg = compose_config(["model=local", f"model.path={folder}", f"model.conditioning.prompts_file={folder / 'prompts.txt'}",
                          *FAMILIES["pixart_alpha_1024"][2]])
    model = load_model(cfg.model, prompt_limit=2)
    cond, _ = model.conditioning.for_indices(torch.arange(2))
    embeds, fields = unpack_for(model.unet, cond)
    pipe = PixArtAlphaPipeline.from_pretrained(folder, local_files_only=True)
    height = 8 * pipe.vae_scale_factor
    assert fields["resolution"].tolist() == [[height, height]] * 2 and fields["aspect_ratio"].tolist() == [[1.0]] * 2
    assert fields["mask"].shape == (2, TOKEN_LENGTH) and set(fields["mask"].flatten().tolist()) <= {0.0, 1.0}
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500])
    direct = model.unet(x, encoder_hidden_states=embeds, encoder_attention_mask=fields["mask"], timestep=t,
                        added_cond_kwargs={"resolution": fields["resolution"],
                                           "aspect_ratio": fields["aspect_ratio"]}).sample[:, :4]
    assert torch.equal(unet_forward(model.unet, x, t, cond), direct)
    without = model.unet(x, encoder_hidden_states=embeds, encoder_attention_mask=fields["mask"], timestep=t,
                         added_cond_kwargs={"resolution": fields["resolution"] * 2,
                                            "aspect_ratio": fields["aspect_ratio"]}).sample[:, :4]
    assert not torch.equal(without, direct)  # the conditions change the prediction


def _rows(student):
    rows = []
    quantizer = next(m for m in student.modules() if isinstance(m, StepIndexed))
    quantizer.register_forward_pre_hook(lambda module, args: rows.append(module.step))
    return rows


def test_stock_pipeline_runs_the_student_of_the_run(family_run):
    import diffusers

    family, folder, run, cfg = family_run
    if family == "pixart_alpha_1024":
        pytest.skip("PixArtAlphaPipeline passes the resolution conditions only at sample size 128 (64x64 "
                    "latent tokens); test_pixart_alpha_conditions_are_the_pipelines checks them")
    _, stock_scheduler, _ = FAMILIES[family]
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"])
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True, **absent)
    if stock_scheduler is not None:  # Sana's flow DPM-Solver config names its shift flow_shift
        shift = {"shift": pipe.scheduler.config.flow_shift} if "flow_shift" in pipe.scheduler.config else {}
        pipe.scheduler = stock_scheduler.from_config(pipe.scheduler.config, **shift)
    prompts = list(PROMPTS[:2])
    model = load_model(cfg.model, prompt_limit=len(prompts))
    cond, uncond = model.conditioning.for_indices(torch.arange(len(prompts)))
    denoiser_key = "unet" if "unet" in index else "transformer"
    kwargs = dict(PIPELINE_KWARGS[family])
    guidance = model.sampler.guidance_scale
    if family == "flux_dev":
        kwargs["guidance_scale"] = cfg.model.conditioning.distilled_guidance
    elif guidance is not None:
        kwargs["guidance_scale"] = guidance

    def run_stock(denoiser, steps=STEPS):
        with_student = pipeline_class(**{**pipe.components, denoiser_key: denoiser})
        with_student.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(sample_seed(SEED, k)) for k in range(len(prompts))]
        latents = with_student(prompts, num_inference_steps=steps, generator=generators, output_type="latent",
                               **kwargs).images
        if family.startswith("flux"):
            return FluxPipeline._unpack_latents(latents, kwargs["height"], kwargs["width"], pipe.vae_scale_factor)
        return latents

    def run_ours(denoiser):
        return sample(denoiser, model.scheduler.config, model.sampler, len(prompts), seed=SEED, cond=cond,
                      uncond=uncond, progress=False)

    fp, fp_ours = run_stock(model.unet), run_ours(model.unet)
    assert fp.shape == fp_ours.shape
    tolerance = 2e-2 if family in FLOW else 1e-4
    assert (fp - fp_ours).abs().max() <= tolerance * fp.abs().max()
    student = dq.load_student(run / "student")
    rows = _rows(student)
    latents = run_stock(student)
    if model.sampler.name == "plms":  # PLMS calls its first step twice: the pipeline's second call keys row 1
        assert rows == [0, 1, 1, 3, 4]
    else:  # one call a step (guidance runs one doubled batch), each on its own row
        assert rows == list(range(STEPS))
        ours = run_ours(dq.load_student(run / "student"))
        assert (latents - ours).abs().max() < (latents - fp).abs().max() or (latents - ours).abs().max() == 0
    assert bool(torch.isfinite(latents).all())
    with pytest.raises(ValueError, match=r"not in the schedule"):
        run_stock(student, steps=STEPS + 2)
    nearest = dq.load_student(run / "student", tpq_policy="nearest")
    assert bool(torch.isfinite(run_stock(nearest, steps=STEPS + 2)).all())


def test_integer_export_of_the_run(family_run):
    from dq.export.__main__ import export_run

    family, _, run, cfg = family_run
    if family == "sana":  # its feed-forward's depthwise convolution has no integer kernel yet
        with pytest.raises(ValueError, match=r"ff.conv_depth is a grouped convolution \(groups=\d+\); the integer "
                                             r"runtime has no grouped kernel yet"):
            export_run(run, verify=2)
        return
    path, summary = export_run(run, verify=2)
    assert path.is_file() and summary["bytes"] < summary["fp32_unet_bytes"]
    # the integer model samples the fake-quant student's latents from the same noise and prompts
    model = load_model(cfg.model, prompt_limit=2)
    cond, uncond = model.conditioning.for_indices(torch.arange(2))
    latents = {name: sample(unet, model.scheduler.config, model.sampler, 2, seed=SEED, cond=cond, uncond=uncond,
                            progress=False)
               for name, unet in (("int", dq.load_student(run / "student", integer=True)),
                                  ("fake_quant", dq.load_student(run / "student")))}
    assert (latents["int"] - latents["fake_quant"]).abs().max() <= 1e-4 * latents["fake_quant"].abs().max()
    if family != "pixart_alpha_1024":  # its tiny random DPM-Solver trajectory reaches |latent| ~ 5e2, where
        # the decoded images saturate and their PSNR says nothing (the latents above agree to ~3e-7)
        assert summary["verify"]["psnr_int_vs_fake_quant"] > 36.0

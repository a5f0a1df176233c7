"""The paper's five settings on tiny models of each architecture class: calibration -> BKD (2 iterations)
-> fidelity sampling (decoded through the FP VAE) via train(cfg), then evaluate(cfg) on the student; the
five model configs; hub checkpoints from the local cache and the clear error offline."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dq.evaluation.pipeline import evaluate
from dq.jobs.train import train
from dq.quant import tpq_num_steps
from dq.sampling import SamplerConfig, planned_timesteps
from dq.zoo import load_components, load_model, model_conditioning, read_prompts
from dq.zoo.components import decode_latents
from tests.conftest import make_tiny_unet
from tests.evaluate.conftest import compose_eval, eval_overrides
from tests.real_settings.conftest import NUM_CLASSES, save_model, tiny_kl_vae, tiny_vq_vae
from tests.train.conftest import CONF_DIR, compose_config, fast_overrides

CFG = ["model.sampler.guidance_scale=2.0", f"model.conditioning.num_classes={NUM_CLASSES}",
       f"model.conditioning.uncond_class={NUM_CLASSES}"]


def run_train(model_dir: Path, tmp_path: Path, extra: list[str]) -> tuple[dict, Path]:
    out = tmp_path / "run"
    cfg = compose_config([*fast_overrides(model_dir, out, tmp_path / "cache"), *extra])
    results = train(cfg)
    assert results["complete"] and results["num_blocks"] > 3
    assert (out / "samples.png").is_file() and (out / "student.safetensors").is_file()
    return results, out


def run_evaluate(run_dir: Path, tmp_path: Path) -> dict:
    overrides = [*eval_overrides(run_dir, tmp_path / "eval", tmp_path / "fp_cache", num_samples=4),
                 f"run={run_dir}", "eval.metrics=[fidelity]", "eval.batch_size=4"]
    return evaluate(compose_eval(overrides))


def test_pixel_class_conditional_with_cfg(pixel_class_dir, tmp_path):
    results, out = run_train(pixel_class_dir, tmp_path, CFG)
    assert results["fidelity_protocol"]["conditioning"] == {"num_classes": NUM_CLASSES, "uncond_class": NUM_CLASSES}
    tuples_meta = results["calibration"]
    assert tuples_meta["guidance_scale"] == 2.0
    metrics = run_evaluate(out, tmp_path)
    assert metrics["protocol"]["conditioning"]["num_classes"] == NUM_CLASSES
    assert metrics["protocol"]["latent_decode"] is None
    assert 0.0 < metrics["psnr_vs_fp"] < 100.0


def test_latent_kl_unconditional(latent_kl_dir, tmp_path):
    results, out = run_train(latent_kl_dir, tmp_path, [])
    assert results["psnr_vs_fp"] > 0
    metrics = run_evaluate(out, tmp_path)
    assert metrics["protocol"]["latent_decode"] == {"vae": "AutoencoderKL", "latent_scale": 0.5}
    assert (tmp_path / "eval" / "samples" / "000000.png").is_file()


def test_latent_vq_class_embedder_cross_attention_with_cfg(latent_vq_class_dir, tmp_path):
    results, out = run_train(latent_vq_class_dir, tmp_path, [*CFG, "model.latent_scale=1.0"])
    assert results["fidelity_protocol"]["conditioning"]["num_classes"] == NUM_CLASSES
    metrics = run_evaluate(out, tmp_path)
    assert metrics["protocol"]["latent_decode"] == {"vae": "VQModel", "latent_scale": 1.0}


def test_text_to_image_with_tiny_clip_and_plms_cfg(text_kl_dir, prompts_file, tmp_path):
    extra = [f"model.conditioning.prompts_file={prompts_file}", "model.sampler.name=plms",
             "model.sampler.spacing=uniform", "model.sampler.guidance_scale=3.0"]
    results, out = run_train(text_kl_dir, tmp_path, extra)
    assert results["num_steps"] == 5  # PLMS: num_steps + 1 model calls
    assert results["fidelity_protocol"]["conditioning"]["num_prompts"] == 3
    metrics = run_evaluate(out, tmp_path)
    assert metrics["protocol"]["conditioning"]["prompts_file"] == str(prompts_file)


def test_text_model_embeds_prompts_and_requires_a_prompts_file(text_kl_dir, prompts_file):
    model_cfg = OmegaConf.create({"source": "local", "path": str(text_kl_dir), "sampler": {"num_steps": 4},
                                  "conditioning": {"prompts_file": str(prompts_file), "max_prompts": 2}})
    components = load_components(model_cfg)
    conditioning = model_conditioning(model_cfg, components)
    assert conditioning.prompts == ("A red car on a street.", "Two dogs play in the snow.")
    assert conditioning.prompt_embeds.shape == (2, 8, 6) and conditioning.uncond_embeds.shape == (1, 8, 6)
    cond, uncond = conditioning.for_indices(torch.arange(3))
    assert torch.equal(cond[2], conditioning.prompt_embeds[0]) and uncond.shape == (3, 8, 6)
    model_cfg.conditioning = None
    with pytest.raises(ValueError, match="set model.conditioning.prompts_file"):
        model_conditioning(model_cfg, components)


def test_read_prompts_text_file_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.txt", limit=1) == ["a cat"]
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_prompts(tmp_path / "bad.json")


@pytest.mark.parametrize("make_vae", [tiny_kl_vae, tiny_vq_vae])
def test_decode_latents_shapes_range_and_scale(make_vae):
    vae = make_vae()
    latents = torch.randn(3, vae.config.latent_channels, 8, 8)
    images = decode_latents(vae, latents, 0.5, batch_size=2)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    expected = vae.decode(latents[:1] / 0.5).sample.clamp(-1, 1)
    torch.testing.assert_close(images[:1], expected)
    with pytest.raises(ValueError, match="channels"):
        decode_latents(vae, torch.randn(1, 7, 8, 8), 1.0)


def test_class_embedder_rows_become_one_token_contexts(latent_vq_class_dir):
    model_cfg = OmegaConf.create({"source": "local", "path": str(latent_vq_class_dir), "sampler": {"num_steps": 4},
                                  "conditioning": {"num_classes": NUM_CLASSES, "uncond_class": NUM_CLASSES}})
    components = load_components(model_cfg)
    conditioning = model_conditioning(model_cfg, components)
    assert conditioning.prompt_embeds.shape == (NUM_CLASSES, 1, 6)
    torch.testing.assert_close(conditioning.uncond_embeds[0, 0], components.class_embeddings[NUM_CLASSES])
    model_cfg.conditioning.uncond_class = NUM_CLASSES + 5
    with pytest.raises(ValueError, match="class_embedder has 5 rows"):
        model_conditioning(model_cfg, components)


def test_latent_scale_on_a_pixel_model_is_an_error(pixel_class_dir):
    model_cfg = OmegaConf.create({"source": "local", "path": str(pixel_class_dir), "latent_scale": 1.0})
    with pytest.raises(ValueError, match="has no vae/"):
        load_components(model_cfg)


@pytest.mark.parametrize(
    ("name", "sampler", "calls"),
    [
        ("ddpm_cifar10", ("ddim", 100, 0.0, "quad", None), 100),
        ("ldm_bedroom", ("ddim", 200, 1.0, "uniform", None), 200),
        ("ldm_church", ("ddim", 500, 0.0, "uniform", None), 500),
        ("ldm_imagenet", ("ddim", 20, 0.0, "uniform", 3.0), 20),
        ("sd_v1_4", ("plms", 50, 0.0, "uniform", 7.5), 51),
    ],
)
def test_the_five_model_configs_carry_the_papers_protocol(name, sampler, calls):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    config = SamplerConfig.from_mapping(cfg.model.sampler)
    assert (config.name, config.num_steps, config.eta, config.spacing, config.guidance_scale) == sampler
    scheduler_config = {"num_train_timesteps": 1000, "steps_offset": 1, "beta_schedule": "scaled_linear"}
    assert len(planned_timesteps(scheduler_config, config)) == calls


def _fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """The HF cache layout snapshot_download reads: refs/main -> snapshots/<commit>/..."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for part in ("unet", "scheduler"):
        for file in (model_dir / part).iterdir():
            (snapshot / part).mkdir(exist_ok=True)
            (snapshot / part / file.name).write_bytes(file.read_bytes())


def test_hub_model_from_the_local_cache_and_clear_error_when_missing(tmp_path, monkeypatch, latent_kl_dir):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=ddpm_cifar10"])
    with pytest.raises(FileNotFoundError, match=r"google/ddpm-cifar10-32 is not in the local HF cache.*model=local"):
        load_model(cfg.model)
    _fake_hub_cache(tmp_path / "hub", "google/ddpm-cifar10-32", latent_kl_dir)
    loaded = load_model(cfg.model)
    assert loaded.sampler.num_steps == 100 and loaded.unet.config.in_channels == 4
    assert tpq_num_steps(loaded.unet) is None


def test_flat_hub_layout_loads(tmp_path, latent_kl_dir):
    flat = tmp_path / "flat"
    flat.mkdir()
    for file in (latent_kl_dir / "unet").iterdir():
        (flat / file.name).write_bytes(file.read_bytes())
    (flat / "scheduler_config.json").write_bytes((latent_kl_dir / "scheduler" / "scheduler_config.json").read_bytes())
    loaded = load_model({"source": "local", "path": str(flat), "sampler": {"num_steps": 4}})
    assert json.loads((flat / "config.json").read_text())["_class_name"] == type(loaded.unet).__name__


def test_vq_latent_scale_defaults_to_the_vae_config(tmp_path):
    root = save_model(tmp_path / "m", make_tiny_unet(channels=3), tiny_vq_vae())
    components = load_components({"source": "local", "path": str(root)})
    assert components.is_latent and components.latent_scale == tiny_vq_vae().config.scaling_factor

"""dq.zoo.convert_compvis against an independent re-implementation of the CompVis LDM classes
(tests/zoo/compvis_reference.py): random CompVis weights -> checkpoint + YAML on disk -> converted folder ->
dq's loaders, and the outputs of every part compared with the CompVis forward."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from dq.arch import describe
from dq.quant import QuantConfig, quantize_model, set_quant_enabled
from dq.sampling import SamplerConfig, planned_timesteps
from dq.zoo import load_components, load_model
from dq.zoo.convert_compvis import convert, main
from tests.zoo.compvis_reference import (
    DESCRIPTIONS,
    TINY_BEDROOM,
    TINY_CHURCH,
    TINY_CIN,
    CompVisVQModel,
    build,
    compvis_ema_unet,
    variant,
)

SAMPLER = {"name": "ddim", "num_steps": 10, "eta": 0.0, "spacing": "uniform", "guidance_scale": None}


def write_source(tmp_path: Path, description: dict, seed: int = 0, ema: bool = False):
    modules, config, checkpoint = build(description, seed=seed, ema=ema)
    ckpt, cfg = tmp_path / "model.ckpt", tmp_path / "config.yaml"
    torch.save(checkpoint, ckpt)
    cfg.write_text(yaml.safe_dump(config))
    return modules, config, checkpoint, ckpt, cfg


def model_cfg(folder: Path):
    return OmegaConf.create({"source": "local", "path": str(folder), "latent_scale": None, "sampler": SAMPLER})


def unet_inputs(description: dict, modules: dict, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    size = description["unet"]["image_size"]
    x = torch.randn(batch, description["unet"]["in_channels"], size, size, generator=g)
    t = torch.tensor([3, 421, 999][:batch])
    context = modules["cond_stage"](torch.tensor([0, 7, 10][:batch])) if modules["cond_stage"] is not None else None
    return x, t, context


def diffusers_unet(unet, x, t, context):
    kwargs = {"encoder_hidden_states": context} if context is not None else {}
    return unet(x, t, **kwargs).sample


@pytest.mark.parametrize("name", sorted(DESCRIPTIONS))
def test_converted_folder_reproduces_every_compvis_part(name, tmp_path):
    description = DESCRIPTIONS[name]
    modules, config, checkpoint, ckpt, cfg = write_source(tmp_path, description)
    out = convert(ckpt, cfg, tmp_path / "out", log=lambda _: None)

    loaded = load_model(model_cfg(out))
    unet, scheduler = loaded.unet, loaded.scheduler
    x, t, context = unet_inputs(description, modules)
    with torch.no_grad():
        expected = modules["unet"](x, t, context)
        got = diffusers_unet(unet, x, t, context)
    assert expected.abs().mean() > 0.05  # random weights everywhere: a real signal, not zeros
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    components = load_components(model_cfg(out))
    first = modules["first_stage"]
    res = first.encoder.resolution
    image = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if isinstance(first, CompVisVQModel):
            latents = first.encode(image)
            torch.testing.assert_close(components.vae.encode(image).latents, latents, atol=2e-5, rtol=1e-4)
        else:
            latents = first.encode_mean(image)
            torch.testing.assert_close(components.vae.encode(image).latent_dist.mean, latents, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(components.vae.decode(latents).sample, first.decode(latents), atol=5e-5, rtol=1e-4)
    expected_scale = description.get("stored_scale_factor") or 1.0
    assert components.latent_scale == pytest.approx(expected_scale)

    if modules["cond_stage"] is not None:
        assert torch.equal(components.class_embeddings, modules["cond_stage"].embedding.weight.detach())
    else:
        assert components.class_embeddings is None

    params = config["model"]["params"]
    betas = torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, params["timesteps"],
                           dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.betas.double(), betas, atol=1e-7, rtol=1e-5)
    # dq's DDIM visits CompVis' DDIM timesteps: range(0, 1000, 1000 // S) + 1, last to first
    steps = planned_timesteps(scheduler.config, SamplerConfig(name="ddim", num_steps=20, eta=0.0, spacing="uniform"))
    assert steps.tolist() == [t + 1 for t in range(0, 1000, 50)][::-1]
    assert scheduler.config.set_alpha_to_one is False
    record = json.loads((out / "conversion.json").read_text())
    assert record["unet"]["weights"] == "raw" and record["vae"]["scaling_factor"] == pytest.approx(expected_scale)


def test_church_heads_survive_quantization(tmp_path):
    """8 (here 2) heads at every width: only unet/attention_heads.json carries them. The quantized student
    with quantization switched off must still equal the CompVis model, so the quantized attention reads them."""
    modules, _, _, ckpt, cfg = write_source(tmp_path, TINY_CHURCH)
    out = convert(ckpt, cfg, tmp_path / "out", log=lambda _: None)
    assert (out / "unet" / "attention_heads.json").is_file()
    loaded = load_model(model_cfg(out))
    unet = loaded.unet
    student = quantize_model(unet, QuantConfig(weight_bits=8, act_bits=8, num_steps=4, num_groups=4, weight_dilation=False),
                             describe(unet))
    set_quant_enabled(student, weights=False, activations=False)
    x, t, _ = unet_inputs(TINY_CHURCH, modules)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t).sample, modules["unet"](x, t), atol=2e-5, rtol=1e-4)
    # and the file matters: the same weights read with one head per layer give other outputs
    (out / "unet" / "attention_heads.json").unlink()
    loaded = load_model(model_cfg(out))
    plain = loaded.unet
    with torch.no_grad():
        assert (plain(x, t).sample - modules["unet"](x, t)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "description",
    [
        variant(TINY_CIN, num_heads=-1, num_head_channels=16),
        variant(TINY_CHURCH, use_new_attention_order=True),
        variant(TINY_BEDROOM, legacy=False),
    ],
    ids=["cin-head-channels", "church-new-attention-order", "bedroom-non-legacy"],
)
def test_unet_variants(description, tmp_path):
    modules, _, _, ckpt, cfg = write_source(tmp_path, description, seed=3)
    out = convert(ckpt, cfg, tmp_path / "out", log=lambda _: None)
    loaded = load_model(model_cfg(out))
    unet = loaded.unet
    x, t, context = unet_inputs(description, modules, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(diffusers_unet(unet, x, t, context), modules["unet"](x, t, context), atol=2e-5, rtol=1e-4)


def test_ema_weights_by_default_and_raw_on_request(tmp_path):
    modules, _, _, ckpt, cfg = write_source(tmp_path, TINY_BEDROOM, ema=True)
    x, t, _ = unet_inputs(TINY_BEDROOM, modules, batch=2)
    ema_out = convert(ckpt, cfg, tmp_path / "ema", log=lambda _: None)
    raw_out = convert(ckpt, cfg, tmp_path / "raw", use_ema=False, log=lambda _: None)
    with torch.no_grad():
        ema_unet, raw_unet = load_model(model_cfg(ema_out)).unet, load_model(model_cfg(raw_out)).unet
        torch.testing.assert_close(ema_unet(x, t).sample, compvis_ema_unet(modules["unet"])(x, t), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(raw_unet(x, t).sample, modules["unet"](x, t), atol=2e-5, rtol=1e-4)
    assert json.loads((ema_out / "conversion.json").read_text())["unet"]["weights"] == "ema"
    (tmp_path / "plain").mkdir()
    plain_ckpt = write_source(tmp_path / "plain", TINY_BEDROOM)[3]  # no model_ema.* keys
    with pytest.raises(ValueError, match="no model_ema"):
        convert(plain_ckpt, cfg, tmp_path / "must_ema", use_ema=True, log=lambda _: None)


def test_bad_inputs_fail_with_a_clear_error(tmp_path):
    _, config, checkpoint, ckpt, cfg = write_source(tmp_path, TINY_BEDROOM)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nope.ckpt", cfg, tmp_path / "a")
    corrupted = tmp_path / "corrupted.ckpt"
    corrupted.write_bytes(ckpt.read_bytes()[: 4096])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        convert(corrupted, cfg, tmp_path / "b")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({**checkpoint, "callbacks": {"cb": Path("x")}}, pickled)  # an object weights_only refuses
    with pytest.raises(ValueError, match="--trust-pickle"):
        convert(pickled, cfg, tmp_path / "c")
    assert convert(pickled, cfg, tmp_path / "c", trust_pickle=True, log=lambda _: None).is_dir()

    missing = {"state_dict": dict(checkpoint["state_dict"])}
    del missing["state_dict"]["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="missing.*input_blocks|down_blocks.0.resnets.0.norm1.weight"):
        convert(tmp_path / "missing.ckpt", cfg, tmp_path / "d")
    extra = {"state_dict": {**checkpoint["state_dict"], "model.diffusion_model.stray.weight": torch.zeros(1)}}
    torch.save(extra, tmp_path / "extra.ckpt")
    with pytest.raises(ValueError, match="stray"):
        convert(tmp_path / "extra.ckpt", cfg, tmp_path / "e")

    mismatched = yaml.safe_load(cfg.read_text())
    mismatched["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    (tmp_path / "mismatched.yaml").write_text(yaml.safe_dump(mismatched))
    with pytest.raises(ValueError, match="does not fit"):
        convert(ckpt, tmp_path / "mismatched.yaml", tmp_path / "f")
    other_schedule = yaml.safe_load(cfg.read_text())
    other_schedule["model"]["params"]["linear_end"] = 0.012
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump(other_schedule))
    with pytest.raises(ValueError, match="betas"):
        convert(ckpt, tmp_path / "schedule.yaml", tmp_path / "g")
    (tmp_path / "not_ldm.yaml").write_text("model:\n  params: {}\n")
    with pytest.raises(ValueError, match="not a CompVis LatentDiffusion config"):
        convert(ckpt, tmp_path / "not_ldm.yaml", tmp_path / "h")

    convert(ckpt, cfg, tmp_path / "out", log=lambda _: None)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(ckpt, cfg, tmp_path / "out")
    assert convert(ckpt, cfg, tmp_path / "out", overwrite=True, log=lambda _: None).is_dir()
    assert config["model"]["params"]["first_stage_config"]["target"].endswith("VQModelInterface")


def test_command_line(tmp_path, capsys):
    _, _, _, ckpt, cfg = write_source(tmp_path, TINY_CIN)
    main(["--ckpt", str(ckpt), "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert "UNet2DConditionModel" in capsys.readouterr().out
    assert (tmp_path / "out" / "class_embedder" / "embeddings.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", str(tmp_path / "missing.ckpt"), "--config", str(cfg), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["church", "cin"])
def test_converted_folder_trains_and_samples(name, tmp_path):
    """The converted folder through dq's whole job: calibration -> BKD (2 iterations a block) -> fidelity
    samples decoded by the converted first stage (cin: class labels through the converted class table)."""
    from tests.real_settings.test_real_settings import run_train

    _, _, _, ckpt, cfg = write_source(tmp_path, DESCRIPTIONS[name])
    out = convert(ckpt, cfg, tmp_path / "model", log=lambda _: None)
    extra = ["model.latent_scale=null"]
    if name == "cin":
        extra += ["+model.conditioning={num_classes: 10, uncond_class: 10}", "model.sampler.guidance_scale=2.0"]
    results, _ = run_train(out, tmp_path, extra)
    assert results["psnr_vs_fp"] > 0
    assert results["fidelity_protocol"]["latent_decode"]["vae"] == ("AutoencoderKL" if name == "church" else "VQModel")


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    """Stopped while writing the class table (the last large file), nothing named --out appears: a half
    folder would load as a class-conditional model without its table."""
    import dq.zoo.convert_compvis as convert_module

    _, _, _, ckpt, cfg = write_source(tmp_path, TINY_CIN)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, cfg, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "model.ckpt"]  # no staging left either
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        convert(ckpt, cfg, tmp_path / "file")
    out = convert(ckpt, cfg, tmp_path / "out", log=lambda _: None)
    (out / "stray.txt").write_text("old")
    convert(ckpt, cfg, out, overwrite=True, log=lambda _: None)
    assert not (out / "stray.txt").exists()  # --overwrite replaces the folder, it does not merge into it

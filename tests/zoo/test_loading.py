import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dq.arch import pack_text_conditioning
from dq.sampling import SamplerConfig
from dq.zoo import load_components, load_model, load_model_folder

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture
def model_folder(tmp_path, tiny_unet, ddpm_scheduler):
    folder = tmp_path / "model"
    tiny_unet.save_pretrained(folder / "unet")
    ddpm_scheduler.save_pretrained(folder / "scheduler")
    return folder


def local_cfg(path):
    return OmegaConf.create({"source": "local", "path": str(path), "sampler": {"name": "ddim", "num_steps": 5}})


def test_local_folder_written_by_save_pretrained_loads(model_folder, tiny_unet, ddpm_scheduler):
    loaded = load_model(local_cfg(model_folder))
    unet, scheduler, sampler = loaded.unet, loaded.scheduler, loaded.sampler
    assert type(unet) is type(tiny_unet) and not unet.training
    for name, tensor in tiny_unet.state_dict().items():
        assert torch.equal(unet.state_dict()[name], tensor), name
    assert type(scheduler) is type(ddpm_scheduler)
    assert scheduler.config.num_train_timesteps == 1000
    assert sampler == SamplerConfig(name="ddim", num_steps=5)


def test_hydra_model_local_override(model_folder):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=local", f"model.path={model_folder}"])
    loaded = load_model(cfg.model)
    unet, sampler = loaded.unet, loaded.sampler
    assert unet.config.sample_size == 8
    assert (sampler.name, sampler.num_steps, sampler.spacing) == ("ddim", 100, "quad")


def test_hydra_model_local_without_path_fails_clearly():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=local"])
    with pytest.raises(ValueError, match=r"model=local needs model.path=/dir"):
        load_model(cfg.model)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), r"unet has no diffusion_pytorch_model.safetensors \(nor sharded"),
        (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(), r"missing \['scheduler/scheduler_config.json'\]"),
        (lambda f: (f / "unet" / "config.json").write_text("{not json"), r"unet/config.json is not valid JSON"),
        (lambda f: _edit_json(f / "unet" / "config.json", _class_name="VQModel"), r"_class_name 'VQModel'"),
        (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", _class_name="os.system"), r"not a diffusers scheduler"),
    ],
    ids=["no-weights", "no-scheduler", "bad-json", "not-a-unet", "bad-scheduler-class"],
)
def test_broken_folder_fails_naming_the_problem(model_folder, breakage, message):
    breakage(model_folder)
    with pytest.raises(ValueError, match=message):
        load_model_folder(model_folder)


def test_pickle_weights_are_refused(model_folder):
    weights = model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="pickle weights are not loaded"):
        load_model_folder(model_folder)


def test_missing_folder_fails(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(local_cfg(tmp_path / "nowhere"))


def test_bad_source_and_sampler_fail(model_folder):
    with pytest.raises(ValueError, match="model.source"):
        load_model({"source": "hub", "sampler": {}})
    cfg = local_cfg(model_folder)
    cfg.sampler.spacing = "cosine"
    with pytest.raises(ValueError, match="spacing"):
        load_model(cfg)


def _edit_json(path, **changes):
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))


def test_transformer_folder_of_a_dit_pipeline_loads(tmp_path, ddpm_scheduler):
    from tests.arch.test_transformers import tiny_dit

    dit = tiny_dit()
    dit.save_pretrained(tmp_path / "dit" / "transformer")  # DiTPipeline's layout
    ddpm_scheduler.save_pretrained(tmp_path / "dit" / "scheduler")
    loaded = load_model(local_cfg(tmp_path / "dit"))
    assert type(loaded.unet).__name__ == "DiTTransformer2DModel"
    for a, b in zip(loaded.unet.state_dict().values(), dit.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_embedded_model_is_refused():
    with pytest.raises(ValueError, match="model.embedded must be one of"):
        load_model({"source": "embedded", "embedded": "vit", "sampler": {"num_steps": 4}})


# ---------------------------------------------------------------- pipeline folders in the hub repos' layouts


@pytest.fixture(scope="module")
def sd15_folders(tmp_path_factory):
    """{"sharded": SD 1.5 pipeline folder, UNet in 3 shards + index; "fp16": the fp16 variant files only}."""
    from tests.zoo.real_layouts import write_sd15

    root = tmp_path_factory.mktemp("sd15")
    return {"sharded": write_sd15(root / "sharded"), "fp16": write_sd15(root / "fp16", variant="fp16")}


def sd15_cfg(folder, **extra):
    return OmegaConf.create({"source": "local", "path": str(folder), "conditioning": {"prompts_file": str(folder / "prompts.txt")},
                             "sampler": {"name": "plms", "num_steps": 4, "spacing": "uniform", "guidance_scale": 7.5},
                             **extra})


@pytest.mark.parametrize("kind", ["sharded", "fp16"])
def test_pipeline_folder_loads_as_diffusers_loads_it(sd15_folders, kind):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from tests.zoo.real_layouts import PROMPTS

    folder = sd15_folders[kind]
    unet_files = sorted(p.name for p in (folder / "unet").iterdir())
    if kind == "sharded":  # the layout is the real one: shards and their index, no single weights file
        assert "diffusion_pytorch_model.safetensors.index.json" in unet_files and len(unet_files) == 5
    else:
        assert unet_files == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    loaded = load_model(sd15_cfg(folder))
    variant = None if kind == "sharded" else "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant=variant, dtype=torch.float32,
                                                   local_files_only=True, safety_checker=None)
    assert type(loaded.unet).__name__ == "UNet2DConditionModel" and isinstance(loaded.scheduler, PNDMScheduler)
    for name, tensor in pipe.unet.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(loaded.unet.state_dict()[name], tensor), name
    for name, tensor in pipe.vae.state_dict().items():
        assert torch.equal(loaded.components.vae.state_dict()[name], tensor), name
    # the prompts as the pipeline's own encode_prompt embeds them, and its empty prompt for guidance
    cond, uncond = pipe.encode_prompt(list(PROMPTS), "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
    assert torch.equal(loaded.conditioning.prompt_embeds, cond) and torch.equal(loaded.conditioning.uncond_embeds, uncond[:1])


def test_a_folder_holding_only_a_variant_says_it_loads_that(sd15_folders, caplog):
    with caplog.at_level("INFO", logger="dq.zoo"):
        load_model_folder(sd15_folders["fp16"])
    assert f"{sd15_folders['fp16'] / 'unet'} holds only fp16 weights: loading those" in caplog.text


def test_dtype_loads_every_part_in_it(sd15_folders):
    loaded = load_model(sd15_cfg(sd15_folders["fp16"], dtype="bfloat16"))
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.components.vae.parameters()} == {torch.bfloat16}
    components = load_components(sd15_cfg(sd15_folders["fp16"], dtype="bfloat16"))
    assert {p.dtype for p in components.text_encoder.parameters()} == {torch.bfloat16}
    assert loaded.components.text_encoder is None  # released once the prompts are encoded
    with pytest.raises(ValueError, match=r"model.dtype must be one of \['bfloat16', 'float16', 'float32'\] or null, got 'half'"):
        load_model_folder(sd15_folders["fp16"], dtype="half")


def test_two_variants_need_a_choice(tmp_path, tiny_unet, ddpm_scheduler):
    folder = tmp_path / "model"
    tiny_unet.half().save_pretrained(folder / "unet", variant="fp16")
    tiny_unet.bfloat16().save_pretrained(folder / "unet", variant="bf16", max_shard_size="20KB")
    ddpm_scheduler.save_pretrained(folder / "scheduler")
    with pytest.raises(ValueError, match=r"unet holds the variants \['bf16', 'fp16'\] only; choose one with model.variant"):
        load_model_folder(folder)
    unet, _ = load_model_folder(folder, variant="bf16")  # the sharded bf16 copy
    assert all(torch.equal(unet.state_dict()[k], v.float()) for k, v in tiny_unet.bfloat16().state_dict().items())
    with pytest.raises(ValueError, match=r"model.variant must be one of \('fp16', 'bf16'\) or null, got 'int8'"):
        load_model_folder(folder, variant="int8")


def test_asked_variant_missing_falls_back_to_the_full_weights_and_says_so(sd15_folders, caplog):
    with caplog.at_level("INFO", logger="dq.zoo"):
        unet, _ = load_model_folder(sd15_folders["sharded"], variant="fp16")
    assert "unet has no fp16 weights: loading its full-precision diffusion_pytorch_model" in caplog.text
    assert next(unet.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "unet" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink(),
         r"unet/diffusion_pytorch_model.safetensors.index.json lists shards that are not in .*unet: "
         r"\['diffusion_pytorch_model-00002-of-00003.safetensors'\]"),
        (lambda f: _edit_json(f / "model_index.json", unet=["diffusers", "UNet3DConditionModel"]),
         r"model_index.json names unet: UNet3DConditionModel, which dq does not quantize"),
        (lambda f: _edit_json(f / "model_index.json", unet=["diffusers", "UNet2DModel"]),
         r"model_index.json names unet: UNet2DModel, but .*unet/config.json is a UNet2DConditionModel"),
        (lambda f: _edit_json(f / "model_index.json", unet=None, transformer=None, prior=["diffusers", "PriorTransformer"]),
         r"model_index.json \(StableDiffusionPipeline\) names no unet or transformer"),
        (lambda f: _edit_json(f / "model_index.json", text_encoder=["transformers", "BertModel"]),
         r"text_encoder holds BertModel; dq loads the text encoders and tokenizers \['CLIPTextModel', "),
    ],
    ids=["missing-shard", "unknown-denoiser", "index-disagrees", "no-denoiser", "unknown-encoder"],
)
def test_broken_pipeline_folder_fails_in_one_line_naming_it(sd15_folders, tmp_path, breakage, message):
    import shutil

    folder = shutil.copytree(sd15_folders["sharded"], tmp_path / "copy")
    breakage(folder)
    with pytest.raises(ValueError, match=message) as error:
        load_model(sd15_cfg(folder))
    assert "\n" not in str(error.value)


def test_a_component_the_index_lists_as_absent_is_not_loaded(sd15_folders, tmp_path):
    import shutil

    folder = shutil.copytree(sd15_folders["sharded"], tmp_path / "copy")
    _edit_json(folder / "model_index.json", text_encoder=[None, None], tokenizer=[None, None])
    cfg = sd15_cfg(folder)
    cfg.conditioning.prompts_file = None
    assert load_components(cfg).text_encoder is None and load_model(cfg).conditioning.prompt_embeds is None


def test_model_local_samples_a_pipeline_folder_as_its_pipeline_does(sd15_folders, caplog):
    folder = sd15_folders["sharded"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=local", f"model.path={folder}",
                                                       f"model.conditioning.prompts_file={folder / 'prompts.txt'}"])
    with caplog.at_level("INFO", logger="dq.zoo"):
        sampler = load_model(cfg.model).sampler
    assert sampler == SamplerConfig(name="plms", num_steps=50, spacing="uniform", guidance_scale=7.5)
    picked = [m for m in caplog.messages if m.startswith("dq: sampler from the folder")]
    assert picked == ["dq: sampler from the folder (StableDiffusionPipeline's 50 steps, guidance 7.5 (PNDMScheduler)): "
                      "name=plms num_steps=50 spacing=uniform guidance_scale=7.5; set model.sampler.<key> to change"]


def test_sd3_pipeline_folder_loads_with_prompt_embeddings_or_encodes_its_prompts(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from tests.zoo.real_layouts import PROMPTS, write_sd3

    folder = write_sd3(tmp_path / "sd3")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    cfg = OmegaConf.create({"source": "local", "path": str(folder), "sampler": {"num_steps": 4},
                            "conditioning": {"prompt_embeds_file": str(folder / "embeds.safetensors")}})
    loaded = load_model(cfg)
    assert type(loaded.unet).__name__ == "SD3Transformer2DModel" and load_components(cfg).text_encoder is None
    assert loaded.sampler == SamplerConfig(name="flow_euler", num_steps=4, spacing="scheduler", guidance_scale=7.0)
    assert loaded.conditioning.prompt_embeds.shape == (4, 4, 12)
    # text prompts: encoded by StableDiffusion3Pipeline's own encode_prompt (the absent T5 gives zeros)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    cfg.conditioning = {"prompts_file": str(tmp_path / "prompts.txt"), "max_sequence_length": 4}
    loaded = load_model(cfg)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(list(PROMPTS), None, None, device="cpu",
                                                                   max_sequence_length=4)
    assert torch.equal(loaded.conditioning.prompt_embeds, pack_text_conditioning(embeds, pooled))
    assert torch.equal(loaded.conditioning.uncond_embeds, pack_text_conditioning(negative, negative_pooled)[:1])
    assert loaded.conditioning.record()["encoding"] == {"pipeline": "StableDiffusion3Pipeline",
                                                        "max_sequence_length": 4, "distilled_guidance": None}


def test_encoded_prompts_are_cached_and_a_changed_encoder_is_a_miss(sd15_folders, tmp_path, caplog):
    import os
    import shutil

    folder = shutil.copytree(sd15_folders["sharded"], tmp_path / "copy")
    cfg = sd15_cfg(folder)
    cfg.conditioning.cache_dir = str(tmp_path / "prompts")
    with caplog.at_level("INFO", logger="dq.zoo"):
        first = load_model(cfg).conditioning
        second = load_model(cfg).conditioning
    assert [m.split(" in ")[0] for m in caplog.messages if "encoded 4 prompts" in m] == [
        "dq: encoded 4 prompts with StableDiffusionPipeline"]
    assert sum("prompt embeddings from the cache" in m for m in caplog.messages) == 1
    assert torch.equal(first.prompt_embeds, second.prompt_embeds)
    assert torch.equal(first.uncond_embeds, second.uncond_embeds) and first.encoding == second.encoding
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 1
    weights = folder / "text_encoder" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a replaced encoder
    caplog.clear()
    with caplog.at_level("INFO", logger="dq.zoo"):
        load_model(cfg)
    assert any("encoded 4 prompts" in m for m in caplog.messages)
    assert len(list((tmp_path / "prompts").glob("*.safetensors"))) == 2


def test_encoding_leaves_the_parts_configs_as_loaded(tmp_path):
    """StableDiffusionPipeline's __init__ rewrites a scheduler's steps_offset to 1: building it to encode
    prompts must not change the schedule dq samples (a cached encoding would then sample another one)."""
    from diffusers import DDPMScheduler

    from dq.zoo.prompts import build_pipeline
    from tests.conftest import make_tiny_text_unet

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", steps_offset=0)
    build_pipeline("StableDiffusionPipeline", {"scheduler": scheduler, "unet": make_tiny_text_unet()})
    assert scheduler.config.steps_offset == 0


def test_prompts_given_as_a_list_are_the_file_s_prompts(sd15_folders):
    from tests.zoo.real_layouts import PROMPTS

    from_file = load_model(sd15_cfg(sd15_folders["sharded"])).conditioning
    cfg = sd15_cfg(sd15_folders["sharded"])
    cfg.conditioning = {"prompts": list(PROMPTS)}
    listed = load_model(cfg).conditioning
    assert listed.prompts == PROMPTS and torch.equal(listed.prompt_embeds, from_file.prompt_embeds)
    assert listed.record()["prompts_file"] == "model.conditioning.prompts"
    cfg.conditioning = {"prompts": "a cat"}
    with pytest.raises(ValueError, match=r"model.conditioning.prompts must be a non-empty list of prompts"):
        load_model(cfg)
    cfg.conditioning = {"prompts": ["a cat"], "prompts_file": str(sd15_folders["sharded"] / "prompts.txt")}
    with pytest.raises(ValueError, match=r"model.conditioning sets prompts_file and prompts; a model takes one of them"):
        load_model(cfg)

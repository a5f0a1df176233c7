"""The plan of a run (dq.plan, dq.jobs.plan): its cache sizes are what BKD really allocates, its traced
peaks are what the CPU really allocates for the same computation, `plan=true` does no work, a run that
cannot fit is refused before any work, and the shipped real-model configs build and plan without weights."""

import contextlib
import dataclasses
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dq.bkd import BlockDistiller, DistillConfig
from dq.errors import UserError
from dq.jobs.plan import DENOISERS_DIR, conditioning_of, meta_denoiser
from dq.jobs.train import train
from dq.plan import GIB, PlanSpec, _FusedSDPA, _Peak, make_plan, meta_student
from dq.quant import QuantConfig
from dq.zoo.loading import load_model_folder
from tests.train.conftest import compose_config, fast_overrides
from tests.zoo.real_layouts import TOKEN_LENGTH, WRITERS

STEPS, N = 4, 20  # N is not a multiple of the capture batch: the last chunk is short


def _calibration(unet: nn.Module, cond: tuple, seed: int = 0) -> dict[str, torch.Tensor]:
    from dq.arch import sample_shape

    g = torch.Generator().manual_seed(seed)
    step = torch.arange(N) % STEPS
    tuples = {"x_t": torch.randn(N, *sample_shape(unet), generator=g), "step": step,
              "timestep": torch.tensor([900, 600, 300, 50])[step]}
    shape, dtype = cond
    if shape is not None:
        make = (lambda: torch.randint(0, 4, (N, *shape), generator=g)) if dtype == torch.int64 else \
            (lambda: torch.randn(N, *shape, generator=g))
        tuples["cond"], tuples["uncond"] = make(), make()
    return tuples


@pytest.mark.parametrize("family,cache_dtype", [(f, "fp32") for f in ["sd14", "sdxl", "pixart_sigma", "sd3", "flux_dev",
                                                                         "sana"]] + [("sd14", "bf16"), ("flux_dev", "bf16")])
def test_planned_cache_bytes_are_what_build_cache_allocates(family, cache_dtype, tmp_path):
    """Per block (and the end-to-end stage), the plan's cache bytes from the meta-device model equal the bytes
    of the cache BlockDistiller.build_cache builds from the real tiny model in the family's hub layout, in
    either cache dtype."""
    folder = WRITERS[family](tmp_path / family)
    unet, _ = load_model_folder(folder, sample_size=8 if family.startswith("flux") else None)
    config = {**unet.config, "_class_name": type(unet).__name__}
    meta = meta_denoiser(config, {})
    cond = conditioning_of(meta, {"conditioning": {"max_sequence_length": TOKEN_LENGTH}})
    quant = QuantConfig(num_steps=STEPS, num_groups=STEPS)
    distill = DistillConfig(iters_per_block=2, batch_size=4, capture_batch_size=8, end_to_end_iters=2,
                            cache_dtype=cache_dtype)
    spec = PlanSpec(num_samples=N, num_trajectories=N, generation_batch_size=4, num_steps=STEPS, guidance=True,
                    cond_shape=cond[0], cond_dtype=cond[1])
    plan = make_plan(meta, quant, distill, spec, trace=False)
    distiller = BlockDistiller(unet, quant, distill, _calibration(unet, cond), seed=1)
    distiller.setup("fit")
    assert [b.name for b in plan.blocks] == distiller.blocks
    for k, block in enumerate(plan.blocks):
        distiller.begin_block(k)
        assert block.cache_bytes == distiller.cache.nbytes, block.name
        assert block.target_bytes == sum(t.numel() * t.element_size() for t in distiller.cache.output), block.name
        assert {t.dtype for t in distiller.cache.output} == {torch.bfloat16 if cache_dtype == "bf16" else torch.float32}
        distiller.end_block()
    # the outputs carried forward: the plan's bound holds what the two replays kept at once
    kept = distiller.replay_peak["host"] + distiller.replay_peak["disk"]
    assert 0 < kept <= max(b.replay_bytes for b in plan.blocks)


def test_traced_peak_on_meta_is_what_the_cpu_allocates():
    """The tracker's peak for a block's training step on the meta device equals the peak of the same step on
    real CPU tensors, and MemTracker's (torch's own tracker) for it."""
    from diffusers.models.attention import BasicTransformerBlock
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    peaks = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        with torch.device(device):
            block = BasicTransformerBlock(64, 4, 16, cross_attention_dim=32)
            x, context = torch.randn(3, 50, 64), torch.randn(3, 7, 32)
        tracker = _Peak()
        # meta's attention is the math one (a score matrix); the CPU's is a fused kernel, as _FusedSDPA models
        with _FusedSDPA() if device == "meta" else contextlib.nullcontext(), tracker:
            block(x, encoder_hidden_states=context).pow(2).mean().backward()
        block.zero_grad(set_to_none=True)
        reference = MemTracker()
        with _FusedSDPA() if device == "meta" else contextlib.nullcontext(), reference:
            block(x, encoder_hidden_states=context).pow(2).mean().backward()
        snapshot = reference.get_tracker_snapshot("peak")[torch.device(device)]
        peaks[device] = tracker.bytes
        reference_bytes = snapshot["Total"] - snapshot[_MemRefType.PARAM] - snapshot[_MemRefType.BUFFER]
        assert tracker.bytes == pytest.approx(reference_bytes, rel=0.01)  # measured: 0.17% apart
    assert peaks["meta"] == pytest.approx(peaks["cpu"], rel=0.01) and peaks["cpu"] > 0


def test_plan_true_prints_the_plan_and_does_no_work(tmp_path, capsys):
    folder = WRITERS["sd14"](tmp_path / "sd14")
    overrides = [o for o in fast_overrides(folder, tmp_path / "run", tmp_path / "cache") if o != "model=local"]
    cfg = compose_config(["model=sd_v1_4", *overrides, "plan=true", "budget.tflops=1"])
    result = train(cfg)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert result["plan"]["blocks"] == plan["blocks"] and len(plan["blocks"]) > 10
    assert plan["spec"]["num_samples"] == 32 and plan["spec"]["cond_shape"] == [77, 6]  # CLIP's 77 tokens
    assert all(v > 0 for v in plan["host_peak_bytes"].values())
    out = capsys.readouterr().out
    assert out.count("dq: plan: peak host") == 1 and "nothing else was done" in out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "student").exists()


def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path):
    folder = WRITERS["sd14"](tmp_path / "sd14")
    overrides = [o for o in fast_overrides(folder, tmp_path / "run", tmp_path / "cache") if o != "model=local"]
    cfg = compose_config(["model=sd_v1_4", *overrides, f"model.conditioning.prompts_file={folder / 'prompts.txt'}",
                          "budget.host_memory_gb=0.00001"])
    with pytest.raises(UserError, match=r"does not fit: its \w+ phase.* needs .* of host memory, 0\.0 MiB is available"):
        train(cfg)
    assert not (tmp_path / "cache").exists()  # no calibration was generated


def test_a_gpu_plan_that_exceeds_the_gpu_names_the_phase():
    with torch.device("meta"):
        from diffusers import UNet2DModel

        model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
                            down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",), norm_num_groups=8)
    spec = PlanSpec(num_samples=64, num_trajectories=16, generation_batch_size=8, num_steps=STEPS, guidance=False,
                    cond_shape=None, device="cuda", gpu_bytes=GIB, host_bytes=64 * GIB)
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=32)
    plan = make_plan(model, QuantConfig(num_steps=STEPS, num_groups=STEPS), distill, spec)
    plan.check_fits()  # fits one GiB
    assert 0 < plan.gpu["train"] < GIB and plan.gpu["end_to_end"] > plan.gpu["train"]
    largest = max(plan.gpu, key=plan.gpu.get)
    tight = dataclasses.replace(plan, spec=dataclasses.replace(spec, gpu_bytes=plan.gpu[largest] - 1))
    with pytest.raises(UserError, match=f"its {largest} phase.* needs .* of GPU memory"):
        tight.check_fits()


# published parameter counts of the denoisers (the model cards / papers), and the conditioning row a run stores
SHIPPED = {
    "sd_v1_4": (859.5e6, (77, 768)), "sd_v1_5": (859.5e6, (77, 768)), "sd_v2_1": (865.9e6, (77, 1024)),
    "sdxl_base": (2567e6, (78, 2048)), "pixart_sigma": (611e6, (301, 4096)), "sd3_medium": (2028e6, (334, 4096)),
    "flux_schnell": (11.89e9, (257, 4096)), "flux_dev": (11.9e9, (513, 4096)), "sana_1600m": (1604e6, (301, 2304)),
    "ldm_bedroom": (274e6, None), "ldm_church": (295e6, None), "ldm_imagenet": (401e6, ()),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_denoiser_configs_build_on_meta(name):
    """Each shipped config builds its denoiser on the meta device with the published parameter count, its
    quantized student builds there too, and the conditioning row follows the model config."""
    from omegaconf import OmegaConf

    from dq.jobs.train import CONF_DIR

    record = json.loads((DENOISERS_DIR / f"{name}.json").read_text())
    model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    if model_cfg.get("source") == "hub":
        assert record["repo_id"] == model_cfg.repo_id
    teacher = meta_denoiser(record["denoiser"], model_cfg)
    params, cond = SHIPPED[name]
    assert math.isclose(sum(p.numel() for p in teacher.parameters()), params, rel_tol=5e-3)
    assert conditioning_of(teacher, model_cfg)[0] == cond
    student = meta_student(teacher, QuantConfig(num_steps=4, num_groups=4))
    assert all(p.is_meta for p in student.parameters())


def test_the_plan_puts_caches_on_disk_when_the_host_cannot_hold_them():
    """cache_device auto: a cache the host budget cannot hold beside the rest goes to disk (memory-mapped), so
    the host peak falls; the GPU takes a cache only while the block's GPU phases stay within
    cache_gpu_fraction of it."""
    from diffusers import UNet2DModel

    with torch.device("meta"):
        model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                            norm_num_groups=8)
    quant, distill = QuantConfig(num_steps=STEPS, num_groups=STEPS), DistillConfig(capture_batch_size=64)
    spec = PlanSpec(num_samples=512, num_trajectories=128, generation_batch_size=8, num_steps=STEPS, guidance=False,
                    cond_shape=None)
    roomy = make_plan(model, quant, distill, spec, trace=False)
    assert {b.cache_device for b in roomy.blocks} == {"cpu"} and roomy.disk == 0
    tight_spec = dataclasses.replace(spec, host_bytes=roomy.host["bkd"] - max(b.cache_bytes for b in roomy.blocks) // 2)
    tight = make_plan(model, quant, distill, tight_spec, trace=False)
    on_disk = [b for b in tight.blocks if b.cache_device == "disk"]
    assert on_disk and tight.disk == max(b.cache_bytes for b in on_disk)
    assert tight.host["bkd"] <= tight_spec.host_bytes < roomy.host["bkd"]
    tight.check_fits()
    gpu_spec = dataclasses.replace(spec, device="cuda", gpu_bytes=GIB)
    on_gpu = make_plan(model, quant, distill, gpu_spec, trace=False)
    assert all(b.gpu["train"] <= 0.5 * GIB for b in on_gpu.blocks if b.cache_device == "cuda")
    assert any(b.cache_device == "cuda" for b in on_gpu.blocks)


def test_batch_sizes_too_large_for_the_gpu_are_lowered_to_fit():
    """On a GPU the capture, training-pass and fidelity batches whose phases would not fit are lowered to the
    largest power of two that fits (budget.fit_batches); the run's trainer then uses those (train.fitted_batches)."""
    from dq.jobs.train import fitted_batches

    with torch.device("meta"):
        from diffusers import UNet2DModel

        model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
                            down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",), norm_num_groups=8)
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=32, end_to_end_iters=0,
                            cache_device="cpu")  # (caches the plan puts on the GPU would shrink with its budget)
    quant = QuantConfig(num_steps=STEPS, num_groups=STEPS)
    spec = PlanSpec(num_samples=64, num_trajectories=16, generation_batch_size=8, num_steps=STEPS, guidance=False,
                    cond_shape=None, device="cuda", gpu_bytes=GIB, host_bytes=64 * GIB)
    roomy = make_plan(model, quant, distill, spec)
    assert roomy.batch_sizes == {"capture": 32, "micro": 8, "fidelity": 128}  # all fit: unchanged
    budget = min(roomy.gpu["capture"], roomy.gpu["train"], roomy.gpu["fidelity"]) - 1  # each must shrink
    tight = make_plan(model, quant, distill, dataclasses.replace(spec, gpu_bytes=budget))
    sizes = tight.batch_sizes
    assert sizes["capture"] < 32 and sizes["micro"] < 8 and sizes["fidelity"] < 128
    assert all(v & (v - 1) == 0 for v in sizes.values())  # powers of two
    for phase in ("capture", "init", "train", "fidelity"):
        assert tight.gpu[phase] <= budget, phase
    tight.check_fits()
    kept = make_plan(model, quant, distill, dataclasses.replace(spec, gpu_bytes=budget), fit_batches=False)
    assert kept.batch_sizes == roomy.batch_sizes
    with pytest.raises(UserError, match="does not fit"):
        kept.check_fits()
    cfg = OmegaConf.create({"fidelity": {"batch_size": 128}})
    fitted = fitted_batches(cfg, distill, tight)
    assert (fitted.capture_batch_size, fitted.micro_batch_size, cfg.fidelity.batch_size) == \
        (sizes["capture"], sizes["micro"], sizes["fidelity"])


def test_under_ddp_a_rank_plans_its_share_of_the_caches():
    with torch.device("meta"):
        from diffusers import UNet2DModel

        model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1,
                            down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",), norm_num_groups=8)
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, end_to_end_iters=0)
    spec = PlanSpec(num_samples=64, num_trajectories=16, generation_batch_size=8, num_steps=STEPS, guidance=False,
                    cond_shape=None, device="cuda", gpu_bytes=GIB, host_bytes=64 * GIB)
    quant = QuantConfig(num_steps=STEPS, num_groups=STEPS)
    one = make_plan(model, quant, distill, spec, trace=False)
    two = make_plan(model, quant, distill, dataclasses.replace(spec, world_size=2), trace=False)
    for a, b in zip(one.blocks, two.blocks, strict=True):  # 32 of the 64 rows: half of every batched byte
        assert b.target_bytes * 2 == a.target_bytes and b.input_bytes < a.input_bytes
    assert two.calibration_file_bytes == one.calibration_file_bytes  # every rank loads the tuples
    assert two.seconds["bkd"] * 2 == pytest.approx(one.seconds["bkd"])


def test_offload_plans_one_block_on_the_gpu():
    with torch.device("meta"):
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                                      num_layers=12, sample_size=8, patch_size=2, num_embeds_ada_norm=11)
    spec = PlanSpec(num_samples=64, num_trajectories=16, generation_batch_size=8, num_steps=STEPS, guidance=False,
                    cond_shape=(), cond_dtype=torch.int64, device="cuda", gpu_bytes=GIB, host_bytes=64 * GIB)
    quant = QuantConfig(num_steps=STEPS, num_groups=STEPS)
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, end_to_end_iters=0, cache_device="cpu")
    whole = make_plan(model, quant, distill, spec)
    offloaded = make_plan(model, quant, dataclasses.replace(distill, offload=True), spec)
    weights = sum(p.numel() * 4 for p in model.parameters())
    # 12 identical blocks: on the device the models shrink from two whole copies to about three blocks' worth
    saved = whole.gpu["train"] - offloaded.gpu["train"]
    assert 0.6 * 2 * weights < saved < 2 * weights
    assert offloaded.host["bkd"] - whole.host["bkd"] == saved  # what left the device waits on the host
    assert offloaded.gpu["fidelity"] == whole.gpu["fidelity"]  # sampling runs the whole models

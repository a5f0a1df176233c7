"""The low-rank branch beside a quantized Linear (QuantConfig.lowrank_rank): SVDQuant's kept split and the
auxiliary branch that decays to zero while its block trains and then leaves the student."""

import lightning as L
import pytest
import torch
from torch import nn

from dq.arch import describe
from dq.bkd import BlockDistiller, DistillConfig
from dq.bkd.blocks import candidate_blocks
from dq.bkd.distiller import lowrank_weight
from dq.calibration import CalibrationDataModule
from dq.errors import UserError
from dq.quant import (
    QuantConfig,
    calibrate_activations,
    drop_lowrank,
    load_quant_state,
    lowrank_layers,
    quantize_model,
    save_quant_state,
    set_lowrank_scale,
    set_quant_enabled,
    set_step,
    step_context,
)
from dq.quant.rotation import rotate
from dq.sampling import sample, unet_forward
from tests.arch.test_transformers import SAMPLER, SCHEDULER, T, _cond, _example, tiny_dit
from tests.quant.test_token_rotation import Layout, _calibrated, _mlp, _tokens

TOKEN = {"act_granularity": "token", "rotation": True, "rotation_block": 16}


def _config(mode: str, rank: int = 4, **options) -> QuantConfig:
    return QuantConfig(num_steps=T, num_groups=T, lowrank_rank=rank, lowrank_mode=mode, **{**TOKEN, **options})


def test_keep_splits_the_rotated_weight_into_branch_and_residual():
    """keep: B·A is the top-r singular part of W' (= s·W·R, after WD and the rotation) and the quantized
    weight holds exactly the rest; the layer with its quantizers off computes the float layer."""
    float_model = _mlp()
    student = quantize_model(float_model, _config("keep", rank=3), Layout())
    assert set(lowrank_layers(student)) == {"0", "2"}
    for name in ("0", "2"):
        layer, reference = student.get_submodule(name), float_model.get_submodule(name).weight.double()
        dilated = reference * layer.wd_scale.double()
        rotated = rotate(dilated, layer.rotation_signs.double(), layer.rotation_block)
        branch = layer.lowrank_up.double() @ layer.lowrank_down.double()
        torch.testing.assert_close(layer.weight.double() + branch, rotated, rtol=0, atol=1e-6)
        singular = torch.linalg.svdvals(rotated)
        torch.testing.assert_close(torch.linalg.svdvals(branch)[:3], singular[:3], rtol=1e-6, atol=1e-6)
        assert layer.lowrank_down.shape == (3, layer.in_features) and layer.lowrank_up.shape == (layer.out_features, 3)
    set_quant_enabled(student, weights=False, activations=False)
    x = _tokens()
    with torch.no_grad():
        set_step(student, torch.arange(3) % T)
        torch.testing.assert_close(student(x), float_model(x), rtol=1e-5, atol=1e-5)


def test_the_branch_sees_the_unquantized_input_and_lowers_the_error():
    """The branch adds x' Aᵀ Bᵀ on the input before its quantizer: with the same 4-bit grids, a kept branch
    gives a smaller output error than the same layer without it."""
    x = _tokens()
    with torch.no_grad():
        want = _mlp()(x)
        errors = {}
        for rank in (0, 8):
            student = _calibrated(_config("keep", rank=rank), x)
            set_step(student, torch.arange(3) % T)
            errors[rank] = (student(x) - want).pow(2).mean().item()
    assert errors[8] < 0.8 * errors[0], errors


def test_decay_starts_at_the_weight_error_and_at_zero_is_the_plain_student():
    """decay: B·A starts as the top-r part of the weight's quantization error (W' − q(W')), and at λ = 0 (or
    dropped) the student computes exactly what the same student without a branch computes."""
    x = _tokens()
    plain, decaying = _calibrated(_config("decay", rank=0), x), quantize_model(_mlp(), _config("decay", rank=4), Layout())
    set_lowrank_scale(decaying, 0.0)  # the second layer's TPQ tables then see what the plain student's saw
    with calibrate_activations(decaying), torch.no_grad():
        set_step(decaying, torch.arange(3) % T)
        decaying(x)
    set_lowrank_scale(decaying, 1.0)
    layer = decaying.get_submodule("0")
    with torch.no_grad():
        error = (layer.weight - layer.weight_quantizer(layer.weight)).double()
        branch = layer.lowrank_up.double() @ layer.lowrank_down.double()
        torch.testing.assert_close(torch.linalg.svdvals(branch)[:4], torch.linalg.svdvals(error)[:4], rtol=1e-6, atol=1e-7)
        for model in (plain, decaying):
            set_step(model, torch.arange(3) % T)
        with_branch = decaying(x)
        set_lowrank_scale(decaying, 0.0)
        torch.testing.assert_close(decaying(x), plain(x), rtol=0, atol=0)
        assert not torch.equal(with_branch, plain(x))
        assert drop_lowrank(decaying) == ["0", "2"] and not lowrank_layers(decaying)
        torch.testing.assert_close(decaying(x), plain(x), rtol=0, atol=0)
        assert not any("lowrank" in k for k in decaying.state_dict())


def test_branch_receives_gradients_and_only_token_wise_linears_carry_one():
    model = tiny_dit()
    student = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, num_steps=T, num_groups=T, lowrank_rank=2,
                                                lowrank_mode="keep"), describe(model))
    layers = lowrank_layers(student)
    arch = describe(model)
    special = {*arch.first_layers, *arch.last_layers, *arch.modulation_layers}
    linears = {n for n, m in student.named_modules() if isinstance(m, nn.Linear)}
    assert set(layers) == linears - special and layers  # rotation off: the branch does not need it
    batch = _example("dit", model)
    set_quant_enabled(student, weights=True, activations=False)  # no calibration needed
    with step_context(student, batch["step"]):
        unet_forward(student, batch["x_t"], batch["timestep"], batch["cond"]).pow(2).mean().backward()
    assert all(m.lowrank_down.grad is not None and m.lowrank_up.grad.abs().sum() > 0 for m in layers.values())


def test_config_refuses_bad_branch_settings():
    with pytest.raises(UserError, match="lowrank_rank"):
        QuantConfig(lowrank_rank=-1)
    with pytest.raises(UserError, match="lowrank_mode"):
        QuantConfig(lowrank_rank=4, lowrank_mode="fade")
    with pytest.raises(UserError, match="lowrank_decay_end"):
        DistillConfig(lowrank_decay_end=0.0)


def _distiller(tmp_path, mode: str, iters: int = 4) -> tuple[BlockDistiller, CalibrationDataModule]:
    model = tiny_dit()
    data = CalibrationDataModule(model, SCHEDULER, SAMPLER, num_samples=32, num_trajectories=8,
                                 cache_dir=tmp_path / "cache", progress=False, num_classes=10)
    distill = DistillConfig(iters_per_block=iters, batch_size=8, capture_batch_size=16, end_to_end_iters=2)
    config = QuantConfig(weight_bits=4, act_bits=4, num_steps=T, num_groups=T, lowrank_rank=2, lowrank_mode=mode,
                         **TOKEN | {"rotation_block": 8})
    return BlockDistiller(model, config, distill, data, seed=0), data


class BranchWeights(L.Callback):
    """Records (block, iteration, λ of the block's branches) after each training step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[float]]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        name = module.blocks[module.state.block]
        layers = lowrank_layers(module.block_module(name)) if name else {}
        self.seen.append((module.state.block, module.state.iteration, [float(m.lowrank_scale) for m in layers.values()]))


def _fit(distiller: BlockDistiller, epochs: int | None = None) -> BranchWeights:
    weights = BranchWeights()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs or len(candidate_blocks(distiller.student)) + 1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[weights],
                        enable_checkpointing=False, reload_dataloaders_every_n_epochs=1)
    trainer.fit(distiller)
    return weights


@pytest.mark.parametrize("mode", ["decay", "keep"])
def test_bkd_trains_the_branches_and_the_saved_student_samples_the_same(mode, tmp_path):
    """BKD + the end-to-end stage: a decaying branch follows λ (1 → 0 by lowrank_decay_end of its block) and
    leaves the student when its block ends; a kept one is trained and saved. Saved and reloaded, the student
    samples bitwise the same."""
    distiller, _ = _distiller(tmp_path, mode)
    before = {n: m.lowrank_up.detach().clone() for n, m in lowrank_layers(distiller.student).items()}
    assert lowrank_weight(0, 4, 0.75) == 1.0 and lowrank_weight(3, 4, 0.75) == lowrank_weight(4, 4, 0.75) == 0.0
    assert 0.0 < lowrank_weight(2, 4, 0.75) < lowrank_weight(1, 4, 0.75) < 1.0
    weights = _fit(distiller)
    remaining = lowrank_layers(distiller.student)
    if mode == "decay":
        assert not remaining and before
        # the λ each training step used: the schedule at the step's iteration (recorded after the step: +1)
        trained = [(k, i, lams) for k, i, lams in weights.seen if lams]
        assert trained and all(lams == pytest.approx([lowrank_weight(i - 1, 4, 0.75)] * len(lams), abs=1e-7)
                                   for _, i, lams in trained)
    else:
        assert set(remaining) == set(before)
        assert all(not torch.equal(m.lowrank_up, before[n]) for n, m in remaining.items())  # trained
        assert all(float(m.lowrank_scale) == 1.0 for m in remaining.values())
    student = distiller.student.eval()
    cond = _cond("dit", 4)
    images = sample(student, SCHEDULER, SAMPLER, 4, seed=0, batch_size=4, progress=False, cond=cond)
    save_quant_state(student, tmp_path / "student.safetensors")
    fresh = tiny_dit()
    loaded = load_quant_state(fresh, tmp_path / "student.safetensors", describe(fresh))
    assert set(lowrank_layers(loaded)) == set(remaining)
    again = sample(loaded, SCHEDULER, SAMPLER, 4, seed=0, batch_size=4, progress=False, cond=cond)
    torch.testing.assert_close(again, images, rtol=0, atol=0)


def test_resume_after_a_decayed_block_drops_its_branches(tmp_path):
    """A checkpoint written after block 0 ended lacks block 0's dropped branches: loading it into a fresh
    distiller drops them there too, and every later block keeps its own."""
    distiller, _ = _distiller(tmp_path, "decay")
    _fit(distiller, epochs=1)
    first = distiller.blocks[0]
    state = distiller.state_dict()
    assert not any(k.startswith(f"student.{first}.") and "lowrank" in k for k in state)
    fresh, _ = _distiller(tmp_path, "decay")
    fresh.load_state_dict(state)
    names = set(lowrank_layers(fresh.student))
    assert names == set(lowrank_layers(distiller.student)) and names
    assert not any(n.startswith(first + ".") for n in names)

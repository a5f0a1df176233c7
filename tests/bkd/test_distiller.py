"""Block-wise Knowledge Distillation (docs/method.md §4, eq. 15) on a tiny UNet: block order, the inputs and
targets of each block, one block in the graph at a time, and exact resume after an interruption."""

import lightning as L
import pytest
import torch
from torch import nn

from dq.bkd import (
    BlockDistiller,
    DistillConfig,
    TPQRangeLogger,
    candidate_blocks,
    capture_block,
    execution_order,
)
from dq.bkd import distiller as distiller_module
from dq.bkd.blocks import same_block_io
from dq.bkd.distiller import training_blocks
from dq.quant import (
    MIN_STEP_SIZE,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    TemporalActQuantizer,
    WeightQuantizer,
    set_step,
)
from tests.conftest import assert_replay_changes_nothing, make_tiny_text_unet, make_tiny_unet
from tests.quant.conftest import tiny_unet2d

T = 4
N = 48


def _calibration(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    step = torch.arange(N) % T
    return {
        "x_t": torch.randn(N, 3, 8, 8, generator=g),
        "step": step,
        "timestep": torch.tensor([900, 600, 300, 50])[step],
    }


def _distiller(iters: int = 4, lr_weights: float = 1e-5, lr_quant: float = 1e-3, **quant) -> BlockDistiller:
    distill = DistillConfig(
        iters_per_block=iters, batch_size=8, capture_batch_size=16, end_to_end_iters=0, lr_weights=lr_weights, lr_quant=lr_quant
    )
    config = QuantConfig(num_steps=T, num_groups=T, **quant)
    return BlockDistiller(tiny_unet2d(), config, distill, _calibration(), seed=3)


def _trainer(distiller: BlockDistiller, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=kwargs.pop("max_epochs", len(candidate_blocks(distiller.student))),
        callbacks=[TPQRangeLogger(), *kwargs.pop("callbacks", [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, **kwargs},
    )


def test_blocks_cover_every_quantized_layer_once_in_execution_order():
    distiller = _distiller()
    distiller.setup("fit")
    blocks = distiller.blocks
    assert blocks[0] == "time_embedding" and blocks[1] == "conv_in" and blocks[-1] == "conv_out"
    first_up = min(i for i, b in enumerate(blocks) if b.startswith("up_blocks"))
    assert all(b.startswith(("time", "conv_in", "down", "mid")) for b in blocks[:first_up])
    assert blocks.index("mid_block.resnets.0") < blocks.index("mid_block.attentions.0") < blocks.index("mid_block.resnets.1")
    layers = [n for n, m in distiller.student.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    for layer in layers:
        owners = [b for b in blocks if layer == b or layer.startswith(b + ".")]
        assert len(owners) == 1, (layer, owners)
    distiller.teacher.unused = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="never ran"):
        execution_order(distiller.teacher, ["unused", "conv_in"], distiller.calibration_batch(slice(0, 2)))


def test_eq15_inputs_come_from_the_student_path_and_targets_from_the_teacher():
    distiller = _distiller()
    distiller.setup("fit")
    for k in range(3):  # initialise the first blocks so that the student path is really quantized
        distiller.begin_block(k)
        distiller.end_block()
    name = distiller.blocks[3]
    cache = distiller.build_cache(name)
    batch = distiller.calibration_batch(slice(0, N))
    teacher_io = capture_block(distiller.teacher, name, batch, want_output=True)
    block_fp = distiller.teacher.get_submodule(name)
    with torch.no_grad():
        torch.testing.assert_close(cache.output, teacher_io.output)  # target = B_k(fp_in_k)
        torch.testing.assert_close(teacher_io.call(block_fp), teacher_io.output)
        student_in = capture_block(distiller.student, name, batch, want_output=False)
        for cached, direct in zip(cache.leaves, student_in.leaves):
            if isinstance(cached, torch.Tensor):
                torch.testing.assert_close(cached, direct)
        # the student's input differs from the teacher's: earlier blocks are quantized
        assert not torch.allclose(student_in.leaves[0], teacher_io.leaves[0])


def test_only_the_current_block_gets_gradients_and_its_loss_falls():
    distiller = _distiller(iters=25)
    trainer = _trainer(distiller, max_steps=25 * 3)
    trainer.fit(distiller)
    assert distiller.state.block == 3  # three blocks trained
    losses = distiller.state.final_losses
    assert set(losses) == set(distiller.blocks[:3])
    untouched = distiller.blocks[4:]
    for name in untouched:
        assert all(p.grad is None for p in distiller.student.get_submodule(name).parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())


class _CacheLoss(L.Callback):
    """The current block's loss over its whole cache before its first and after its last update."""

    def __init__(self) -> None:
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    @staticmethod
    def _loss(pl_module) -> float:
        name = pl_module.blocks[pl_module.state.block]
        set_step(pl_module.student, pl_module.calibration["step"])
        with torch.no_grad():
            prediction = pl_module.cache.call(pl_module.student.get_submodule(name))
        return float(nn.functional.mse_loss(prediction[0], pl_module.cache.output[0]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.state.iteration == 0:
            self.before[pl_module.blocks[pl_module.state.block]] = self._loss(pl_module)
            set_step(pl_module.student, pl_module.calibration["step"][batch["index"]])  # the batch's steps again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.state.iteration == pl_module.distill.iters_per_block:
            self.after[pl_module.blocks[pl_module.state.block]] = self._loss(pl_module)


def test_bkd_lowers_the_block_loss():
    distiller = _distiller(iters=60, lr_weights=3e-4, lr_quant=1e-2)
    probe = _CacheLoss()
    _trainer(distiller, max_steps=60 * 6, callbacks=[probe]).fit(distiller)
    # the 4-bit blocks; conv_in is 8-bit with identical FP and student inputs: its loss is rounding noise
    # that STE training cannot reduce
    ratios = {name: probe.after[name] / probe.before[name] for name in distiller.blocks[:6] if name != "conv_in"}
    assert all(r < 1.0 for r in ratios.values()), ratios
    assert sum(ratios.values()) / len(ratios) < 0.8, ratios


class _Interrupt(Exception):
    pass


class _StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise _Interrupt


def test_resume_mid_block_matches_an_uninterrupted_run(tmp_path):
    iters = 6
    reference = _distiller(iters=iters)
    _trainer(reference).fit(reference)

    interrupted = _distiller(iters=iters)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    stop_step = 3 * iters + 2  # in the middle of block 3
    with pytest.raises(_Interrupt):
        _trainer(interrupted, callbacks=[checkpoint, _StopAt(stop_step)], enable_checkpointing=True).fit(interrupted)
    assert interrupted.state.block == 3

    resumed = _distiller(iters=iters)
    _trainer(resumed).fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.state.final_losses.keys() == reference.state.final_losses.keys()
    ref_state, res_state = reference.student.state_dict(), resumed.student.state_dict()
    for key in ref_state:
        torch.testing.assert_close(res_state[key], ref_state[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in reference.state.final_losses:
        assert resumed.state.final_losses[key] == pytest.approx(reference.state.final_losses[key], rel=1e-4)


def test_initialisation_only_calibrates_every_block():
    distiller = _distiller(iters=0)
    distiller.initialize_only()
    assert all(distiller.state.initialized) and not distiller.state.final_losses
    set_step(distiller.student, 1)
    with torch.no_grad():
        out = distiller.student(torch.randn(2, 3, 8, 8), torch.tensor([600, 600])).sample
    assert torch.isfinite(out).all()


def test_whole_model_qat_is_one_block():
    distiller = BlockDistiller(
        tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T),
        DistillConfig(iters_per_block=3, batch_size=8, capture_batch_size=16, end_to_end_iters=0, whole_model=True), _calibration(),
    )
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[TPQRangeLogger()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(distiller)
    assert distiller.blocks == [""] and list(distiller.state.final_losses) == ["model"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="iters_per_block"):
        DistillConfig(iters_per_block=-1)
    with pytest.raises(ValueError, match="learning rates"):
        DistillConfig(lr_quant=0.0)
    distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), DistillConfig(batch_size=64), _calibration())
    with pytest.raises(ValueError, match="fewer than one batch"):
        distiller.setup("fit")
    distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), DistillConfig(batch_size=8), {"x_t": torch.ones(1)})
    with pytest.raises(ValueError, match="lacks 'timestep'"):
        distiller.setup("fit")


def _step_sizes(distiller: BlockDistiller) -> torch.Tensor:
    return torch.cat([m.scale.detach().flatten() for m in distiller.student.modules()
                      if isinstance(m, (TemporalActQuantizer, WeightQuantizer))])


@pytest.mark.parametrize("floor", [True, False])
def test_step_sizes_stay_positive_under_a_schedule_that_would_cross_zero(floor, monkeypatch):
    if not floor:  # the premise: this schedule does drive step sizes through zero without the projection
        monkeypatch.setattr(distiller_module, "keep_step_sizes_positive", lambda optimizer: None)
    distiller = _distiller(iters=4, lr_quant=50.0)  # Adam moves each Δ by ~50 |Δ| a step
    _trainer(distiller, max_steps=8).fit(distiller)
    scales = _step_sizes(distiller)
    if floor:
        assert bool(scales.min() >= torch.tensor(MIN_STEP_SIZE, dtype=scales.dtype))  # the floor, in float32
    else:
        assert float(scales.min()) < 0.0


def _caches_of_every_block(target_cache_mb: float) -> tuple[list[list[str]], list]:
    """Initialise block by block (as BKD does), recording each block's cache and the teacher passes' groups."""
    distill = DistillConfig(iters_per_block=1, batch_size=8, capture_batch_size=16, end_to_end_iters=0, target_cache_mb=target_cache_mb)
    distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
    distiller.setup("fit")
    groups, caches = [], []
    for k in range(len(distiller.blocks)):
        if distiller.blocks[k] not in distiller._targets:
            groups.append(distiller.target_group(distiller.blocks[k]))
        distiller.begin_block(k)
        caches.append(distiller.cache)
        distiller.end_block()
    return groups, caches


def test_one_teacher_pass_for_several_blocks_leaves_every_cache_unchanged():
    one_per_block, reference = _caches_of_every_block(0)
    assert all(len(g) == 1 for g in one_per_block)
    probe = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), DistillConfig(), _calibration())
    probe.setup("fit")
    probe.target_group(probe.blocks[0])
    row_bytes = probe._target_row_bytes
    small = 2.5 * sorted(row_bytes.values())[len(row_bytes) // 2] * N / 2**20  # ~2-3 blocks a pass
    for budget_mb in (small, 1024):
        groups, caches = _caches_of_every_block(budget_mb)
        assert [n for g in groups for n in g] == [g[0] for g in one_per_block]  # every block once, in order
        assert all(len(g) == 1 or sum(row_bytes[n] for n in g) * N <= budget_mb * 2**20 for g in groups)
        assert (1 < len(groups) < len(one_per_block)) if budget_mb == small else len(groups) == 1
        for got, want in zip(caches, reference):  # bitwise: the same passes, only fewer of them
            assert len(got.output) == len(want.output) and all(map(torch.equal, got.output, want.output))
            for a, b in zip(got.leaves, want.leaves):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_initialisation_only_never_runs_the_teacher(monkeypatch):
    distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T),
                               DistillConfig(iters_per_block=0, batch_size=8, capture_batch_size=16, end_to_end_iters=0), _calibration())
    distiller.setup("fit")  # orders the blocks on the teacher; after that PTQ needs only the student's inputs
    monkeypatch.setattr(distiller.teacher, "forward", lambda *a, **k: pytest.fail("the teacher ran"))
    for k in range(len(distiller.blocks)):
        distiller.begin_block(k)
        assert distiller.cache.output is None
        distiller.end_block()
    assert all(distiller.state.initialized)


def test_target_cache_budget_is_checked():
    with pytest.raises(ValueError, match="target_cache_mb"):
        DistillConfig(target_cache_mb=-1)


def _train_recording_caches(monkeypatch, replay_cache_mb: float, readers=None, **distill):
    """Train every block (2 iterations, a rate that moves every block) and record each block's cache, how many
    student block forwards its prefix pass ran and how many teacher block forwards ran in all (targets and
    checks); readers: replace the traced block readers (a wrong trace)."""
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, end_to_end_iters=0, lr_weights=1e-2,
                            replay_cache_mb=replay_cache_mb, **distill)
    distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
    caches, calls, peak, teacher_calls = [], [], {"host": 0, "disk": 0}, [0]
    resnet_class = type(distiller.student.get_submodule("mid_block.resnets.0"))
    resnet_forward = resnet_class.forward

    student_modules = {id(m) for m in distiller.student.modules()}
    teacher_modules = {id(m) for m in distiller.teacher.modules()}

    building = [False]

    def counted(module, *args, **kwargs):
        if building[0]:
            calls[-1] += id(module) in student_modules
        teacher_calls[0] += id(module) in teacher_modules
        return resnet_forward(module, *args, **kwargs)

    build_cache = distiller.build_cache

    def recording(name):
        if readers is not None:
            distiller._readers = readers(distiller._readers)
        calls.append(0)
        building[0] = True
        try:
            cache = build_cache(name)
        finally:
            building[0] = False
        for place, tensors in (("host", distiller.replay.host_bytes + distiller.teacher_replay.host_bytes),
                               ("disk", distiller.replay.disk_bytes + distiller.teacher_replay.disk_bytes)):
            peak[place] = max(peak[place], tensors)
        caches.append(cache)
        return cache

    monkeypatch.setattr(distiller, "build_cache", recording)
    monkeypatch.setattr(resnet_class, "forward", counted)  # counts the resnet blocks run
    _trainer(distiller).fit(distiller)
    calls.append(teacher_calls[0])
    return distiller, caches, calls, peak


def _assert_same_caches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert same_block_io(a, b) and all(map(torch.equal, a.output, b.output))


def test_replayed_prefix_passes_leave_every_cache_and_the_trained_student_unchanged(monkeypatch):
    # one teacher pass per block (target_cache_mb=0): without replay each reruns the teacher's prefix
    plain, reference, plain_calls, _ = _train_recording_caches(monkeypatch, 0, target_cache_mb=0)
    replayed, caches, calls, peak = _train_recording_caches(monkeypatch, 1024, target_cache_mb=0)
    _assert_same_caches(caches, reference)  # bitwise, after every block was trained
    state, want = replayed.student.state_dict(), plain.student.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    # the student's prefix ran its resnets again in every later block without replay, and almost never with it
    # (once per block on the first chunk: the check); the teacher's passes likewise (the last entry)
    assert sum(plain_calls[:-1]) > 3 * sum(calls[:-1]) and peak["host"] > 0 and peak["disk"] == 0
    # (each pass still runs its first chunk in full as the check: a third of the work here, with 3 chunks)
    assert plain_calls[-1] > 2 * calls[-1]
    assert not plain.replay.outputs and not plain.replay.shapes and not plain.teacher_replay.shapes
    # the trace: the time embedding reaches every resnet (and the mid block's attention, which takes it), a
    # down block's output the up block it skips to
    readers, blocks = replayed._readers, replayed.blocks
    resnets = {blocks.index(b) for b in blocks if ".resnets." in b}
    assert readers["time_embedding"] == resnets | {blocks.index("mid_block.attentions.0")}
    assert blocks.index("up_blocks.1.resnets.0") in readers["down_blocks.0.resnets.0"]


def test_a_prefix_pass_that_a_wrong_trace_would_change_is_caught_and_run_in_full(monkeypatch, caplog):
    _, reference, _, _ = _train_recording_caches(monkeypatch, 0, target_cache_mb=0)
    # a trace that saw no reads: every value dropped at once, every earlier block a stand-in of zeros
    with caplog.at_level("WARNING", logger="dq.bkd.distiller"):
        _, caches, _, _ = _train_recording_caches(monkeypatch, 1024, readers=lambda r: {}, target_cache_mb=0)
    _assert_same_caches(caches, reference)
    assert "the forward-pass trace did not see" in caplog.text
    assert "the teacher's outputs of" in caplog.text  # the teacher's passes check theirs as well


@pytest.mark.parametrize("spill", [True, False])
def test_replayed_values_past_their_host_budget_go_to_disk(monkeypatch, tmp_path, spill):
    _, reference, plain_calls, _ = _train_recording_caches(monkeypatch, 0)
    budget_mb = 0.05  # about one block's outputs on the 48 tuples
    _, caches, calls, peak = _train_recording_caches(monkeypatch, budget_mb, replay_spill=spill,
                                                     cache_dir=str(tmp_path))
    _assert_same_caches(caches, reference)
    assert 0 < peak["host"] <= budget_mb * 2**20
    if spill:  # carried forward whatever the budget: the prefix passes run as few blocks as with a large one
        assert peak["disk"] > 0 and 3 * sum(calls[:-1]) < sum(plain_calls[:-1])
        assert not list(tmp_path.rglob("*.bin"))  # mapped files are unlinked at once
    else:
        assert peak["disk"] == 0
    with pytest.raises(ValueError, match="replay_cache_mb"):
        DistillConfig(replay_cache_mb=-1)


@pytest.mark.parametrize("kind", ["text", "class"])
def test_replay_leaves_conditional_unets_bitwise_unchanged(kind, caplog):
    """Cross-attention (the text embeddings are a block input of their own) and class-conditional UNets."""
    make = (lambda: make_tiny_text_unet()) if kind == "text" else (lambda: make_tiny_unet(num_class_embeds=5))
    data = _calibration()
    channels = make().config.in_channels
    data["x_t"] = torch.randn(N, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    data["cond"] = (torch.randn(N, 3, 6, generator=torch.Generator().manual_seed(2)) if kind == "text"
                    else torch.arange(N) % 5)
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, end_to_end_iters=0, lr_weights=1e-2)
    config = QuantConfig(num_steps=T, num_groups=T)
    distiller = BlockDistiller(make(), config, distill, data, seed=3)
    with caplog.at_level("WARNING", logger="dq.bkd.distiller"):
        _trainer(distiller).fit(distiller)
    assert_replay_changes_nothing(make, config, distill, data, distiller, caplog.text)


def _trained_state(act_drop: float) -> dict[str, torch.Tensor]:
    distill = DistillConfig(iters_per_block=3, batch_size=8, capture_batch_size=16, end_to_end_iters=0, act_drop=act_drop)
    distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
    _trainer(distiller).fit(distiller)
    return {k: v.clone() for k, v in distiller.student.state_dict().items()}


def test_activation_drop_changes_training_reproducibly_and_is_off_after_it():
    plain, dropped, again = _trained_state(0.0), _trained_state(0.5), _trained_state(0.5)
    assert all(torch.equal(dropped[k], again[k]) for k in dropped)  # masks are a function of seed/block/step
    assert any(not torch.equal(dropped[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="act_drop"):
        DistillConfig(act_drop=1.0)


def _end_to_end_distiller(iters: int = 3, end_to_end_iters: int = 5, scale: float = 1.0) -> BlockDistiller:
    distill = DistillConfig(iters_per_block=iters, batch_size=8, capture_batch_size=16, lr_weights=1e-3,
                            lr_quant=1e-2, lr_zero_point=1e-1, end_to_end_iters=end_to_end_iters,
                            end_to_end_lr_weights=1e-3 * scale, end_to_end_lr_quant=1e-2 * scale,
                            end_to_end_lr_zero_point=1e-1 * scale)
    return BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)


def _end_to_end_trainer(distiller: BlockDistiller, **kwargs) -> L.Trainer:
    return _trainer(distiller, max_epochs=len(candidate_blocks(distiller.student)) + 1,
                    reload_dataloaders_every_n_epochs=1, **kwargs)


class _BeforeEndToEnd(L.Callback):
    """The student's state and its whole-model loss on the calibration set after the last BKD block (callbacks'
    epoch-start hooks run before the module's, which begins the stage)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.state.block == len(pl_module.blocks) - 1:
            self.state = {k: v.clone() for k, v in pl_module.student.state_dict().items()}
            self.loss = _model_loss(pl_module)


@torch.no_grad()
def _model_loss(distiller: BlockDistiller) -> float:
    batch = distiller.calibration_batch(slice(0, N))
    set_step(distiller.student, batch["step"])
    student = distiller.student(batch["x_t"], batch["timestep"]).sample
    teacher = distiller.teacher(batch["x_t"], batch["timestep"]).sample
    return float(torch.nn.functional.mse_loss(student, teacher))


def test_end_to_end_stage_runs_after_the_blocks_and_trains_the_whole_student():
    distiller = _end_to_end_distiller(end_to_end_iters=20, scale=0.1)
    probe = _BeforeEndToEnd()
    trainer = _end_to_end_trainer(distiller, callbacks=[probe])
    trainer.fit(distiller)
    blocks = candidate_blocks(distiller.student)
    assert distiller.blocks == [*blocks, ""] and "model" in distiller.state.final_losses
    assert trainer.global_step == 3 * len(blocks) + 20  # each block its iterations, then the stage's
    after = distiller.student.state_dict()
    # the stage moved the weights and TPQ tables of the first and the last block, which BKD had frozen
    for key in ("conv_in.weight", "conv_out.weight", "conv_in.act_quantizer.scale"):
        assert not torch.equal(after[key], probe.state[key]), key
    assert _model_loss(distiller) < probe.loss


class _StageRates(L.Callback):
    """The base learning rates of the weight and zero-point groups at the first step of each block."""

    def __init__(self) -> None:
        self.rates: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.state.iteration == 0:
            groups = pl_module.optimizers().param_groups
            self.rates[pl_module.state.block] = {g["kind"]: g["base_lr"] for g in groups if "kind" in g}


def test_end_to_end_stage_has_its_own_learning_rates_and_resumes_exactly(tmp_path):
    scaled, rates = _end_to_end_distiller(scale=0.25), _StageRates()
    _end_to_end_trainer(scaled, callbacks=[rates]).fit(scaled)
    stage = len(scaled.blocks) - 1
    assert rates.rates[0] == pytest.approx({"weights": 1e-3, "zero_point": 1e-1})  # the blocks' rates
    assert rates.rates[stage] == pytest.approx({"weights": 0.25e-3, "zero_point": 0.25e-1})  # the stage's

    interrupted = _end_to_end_distiller(scale=0.25)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    stop_step = 3 * len(candidate_blocks(interrupted.student)) + 2  # inside the end-to-end stage
    with pytest.raises(_Interrupt):
        _end_to_end_trainer(interrupted, callbacks=[checkpoint, _StopAt(stop_step)], enable_checkpointing=True).fit(interrupted)
    resumed = _end_to_end_distiller(scale=0.25)
    _end_to_end_trainer(resumed).fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    reference, state = scaled.student.state_dict(), resumed.student.state_dict()
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_end_to_end_settings_are_checked():
    with pytest.raises(ValueError, match="end_to_end_iters must be"):
        DistillConfig(end_to_end_iters=-1)
    with pytest.raises(ValueError, match="end-to-end learning rates"):
        DistillConfig(end_to_end_iters=2, end_to_end_lr_quant=0.0)
    for conflicting in ({"whole_model": True}, {"iters_per_block": 0}):
        with pytest.raises(ValueError, match="needs iters_per_block > 0 and whole_model false"):
            DistillConfig(end_to_end_iters=2, **conflicting)
    distiller = _end_to_end_distiller()
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        _trainer(distiller, max_epochs=len(candidate_blocks(distiller.student)) + 1).fit(distiller)


def test_under_ddp_each_rank_caches_its_share_of_the_rows(monkeypatch):
    """Rank r of W caches (and initialises and trains on) calibration rows r, r + W, ...: its cache is those
    rows of one process's cache, bitwise, inputs and targets (tests/train: 2 gloo processes train as one)."""
    distill = DistillConfig(iters_per_block=1, batch_size=8, capture_batch_size=16, end_to_end_iters=0)
    whole = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
    whole.setup("fit")
    whole.begin_block(0)
    for rank in range(2):
        monkeypatch.setattr(BlockDistiller, "_world", lambda self, rank=rank: (2, rank))
        shard = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
        shard.setup("fit")
        assert shard.num_local == N // 2 and torch.equal(shard.local_rows, torch.arange(rank, N, 2))
        shard.begin_block(0)
        for mine, all_rows in zip(shard.cache.tensors(), whole.cache.tensors(), strict=True):
            assert torch.equal(mine, all_rows[rank::2])
        # a global batch: the rows this rank holds, at their positions in its cache
        rows, steps, weight = shard.shard(torch.tensor([0, 1, 2, 5, 8]), torch.tensor([0, 1, 2, 1, 0]))
        want = torch.tensor([0, 1, 4]) if rank == 0 else torch.tensor([0, 2])
        assert torch.equal(rows, want) and weight == 1.0


def test_micro_batches_give_the_gradients_of_the_whole_batch(monkeypatch):
    """micro_batch_size splits each batch into passes whose gradients add up to those of one pass over it."""
    grads = {}

    def record(key):
        def first_step(optimizer):
            if key not in grads:
                grads[key] = [p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return first_step

    for micro in (None, 3):  # batch 8: passes of 3, 3 and 2 rows
        monkeypatch.setattr(distiller_module, "keep_step_sizes_positive", record(micro))
        distill = DistillConfig(iters_per_block=1, batch_size=8, capture_batch_size=16, end_to_end_iters=0,
                                micro_batch_size=micro)
        distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
        _trainer(distiller, max_epochs=1).fit(distiller)
    assert len(grads[None]) == len(grads[3]) > 0
    for whole, parts in zip(grads[None], grads[3]):
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="micro_batch_size"):
        DistillConfig(micro_batch_size=0)


def test_offloaded_blocks_train_the_same_student_and_leave_no_hooks():
    """offload: every block but the one being trained lives on the host and is moved to the device for a call
    (on a CPU run both are the host: the same code runs, nothing moves). The student is bitwise the same."""
    students, hooked = {}, {}
    for offload in (False, True):
        distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, end_to_end_iters=2,
                                lr_weights=1e-2, offload=offload, target_cache_mb=0)
        distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
        begin = distiller.begin_block

        def counting(k, distiller=distiller, begin=begin, offload=offload):
            begin(k)  # the blocks with move hooks while block k trains: all but k (the stage: the teacher's only)
            hooked.setdefault(offload, []).append(len(distiller._offload_hooks))

        distiller.begin_block = counting
        _trainer(distiller, max_epochs=len(training_blocks(distiller.student, distill))).fit(distiller)
        students[offload] = distiller.student.state_dict()
        assert not distiller._offload_hooks  # teardown removed them
    assert all(torch.equal(students[True][k], students[False][k]) for k in students[False])
    blocks = len(hooked[True]) - 1  # the last entry is the end-to-end stage
    assert hooked[False] == [0] * (blocks + 1)
    assert hooked[True][:blocks] == [2 * blocks - 1] * blocks and hooked[True][-1] == blocks

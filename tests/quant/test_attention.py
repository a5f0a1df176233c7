"""Quantized attention (dq.quant.attention): attention tiled over query chunks equals the untiled one in values
and gradients, holds one chunk's scores for backward, and the rotary embedding matches diffusers'."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from dq.arch import describe
from dq.quant import (
    QuantAttnProcessor,
    QuantConfig,
    TemporalActQuantizer,
    calibrate_activations,
    quantize_model,
    set_attention_chunk,
    set_step,
)
from dq.quant.attention import apply_rotary, attend, query_chunk_rows

from .conftest import tiny_unet2d, tiny_unet2d_condition

N, LQ, LK, D = 6, 10, 7, 4  # batch·heads, queries, keys, head size; 10 queries split as 1, 3 (4 + 3 + 3), 4
STEPS = torch.tensor([0, 1, 2])  # per-sample TPQ steps: each covers N / 3 = 2 heads


def _assert_same_gradient(got, want, msg=None):
    """Equal to fp32 rounding of a reordered sum: a gradient of Δ or z sums thousands of terms of both signs, which
    the chunks add in another order (measured: 4e-4 on a Δ gradient of 1.25 whose tensor's largest is 113)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-7, msg=msg)


def _budget(rows: int) -> float:
    """The chunk_mb that gives `rows` queries a chunk."""
    return rows * N * LK * 4 / 2**20


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, length, D, generator=g).requires_grad_() for length in (LQ, LK, LK)]


def _probs_quantizer(lsq: bool = False) -> TemporalActQuantizer:
    quantizer = TemporalActQuantizer(8, num_steps=3, num_groups=3, lsq_grad_scale=lsq)
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([1 / 255, 0.5 / 255, 0.8 / 255]))
        quantizer.zero_point.copy_(torch.tensor([0.0, 3.0, 1.0]))
    quantizer.calibrated.fill_(True)
    return quantizer


def _run(chunk_mb, lsq=False, mask=None):
    """Output and gradients (q, k, v, Δ, z) of one tiled or untiled attention; the step is cleared before
    backward, as the distiller's step_context does."""
    quantizer = _probs_quantizer(lsq)
    q, k, v = _inputs()
    quantizer.step = STEPS
    out = attend(q, k, v, D**-0.5, quantizer, mask, chunk_mb)
    quantizer.step = None
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [q.grad, k.grad, v.grad, quantizer.scale.grad, quantizer.zero_point.grad]


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("lsq", [False, True])
def test_tiled_attention_equals_untiled_in_values_and_gradients(rows, lsq):
    assert query_chunk_rows(torch.empty(N, LK, D), _budget(rows)) == rows
    mask = torch.randn(N, 1, LK, generator=torch.Generator().manual_seed(3))  # a key mask, as diffusers builds
    want, want_grads = _run(None, lsq, mask)
    got, got_grads = _run(_budget(rows), lsq, mask)
    assert torch.equal(got, want)  # bitwise: every query row is computed by the same operations either way
    for g, w in zip(got_grads, want_grads, strict=True):
        _assert_same_gradient(g, w)


def _saved_bytes(fn) -> int:
    """Bytes of the storages autograd keeps for backward while fn runs (each storage once: every chunk saves the
    same k and v; deterministic, any device)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_tiled_attention_keeps_no_score_matrix_for_backward():
    n, length, d = 8, 256, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, length, d, generator=g).requires_grad_() for _ in range(3))
    quantizer = _probs_quantizer()
    quantizer.step = 1
    scores_bytes = n * length * length * 4  # the whole fp32 score matrix: 2 MiB
    chunk = 32 * n * length * 4  # a 32-query chunk's: 256 KiB
    inputs = 3 * n * length * d * 4

    def run(chunk_mb):
        return _saved_bytes(lambda: attend(q, k, v, d**-0.5, quantizer, None, chunk_mb))

    tiled, untiled = run(chunk / 2**20), run(None)
    assert tiled <= inputs + chunk  # the checkpointed chunks keep only their inputs
    assert untiled > scores_bytes  # untiled: several score-sized tensors (scores, probabilities, quantized)
    assert not untiled <= inputs + chunk  # the bound fails with tiling off


def test_minmax_calibration_sees_the_same_extremes_in_chunks():
    def tables(chunk_mb):
        quantizer = TemporalActQuantizer(8, num_steps=3, num_groups=3)
        q, k, v = _inputs()
        quantizer.start_observing()
        quantizer.step = STEPS
        with torch.no_grad():
            attend(q, k, v, D**-0.5, quantizer, None, chunk_mb)
        quantizer.finish_observing()
        return quantizer.scale.detach(), quantizer.zero_point.detach()

    for got, want in zip(tables(_budget(3)), tables(None), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("build", [tiny_unet2d, tiny_unet2d_condition])
def test_tiled_processor_equals_untiled_in_a_student(build):
    """A whole quantized attention module (QuantLinear projections, q/k/v and probability quantizers): the same
    output and gradients (input, projection weights, every Δ and z) with chunks of 1 and 5 queries as untiled."""
    model = build()
    student = quantize_model(model, QuantConfig(num_steps=3, num_groups=3), describe(model))
    cfg = model.config
    x = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1))
    kwargs = {}
    if getattr(cfg, "cross_attention_dim", None):
        kwargs["encoder_hidden_states"] = torch.randn(3, 5, cfg.cross_attention_dim)
    with calibrate_activations(student), torch.no_grad():
        set_step(student, STEPS)
        student(x, torch.tensor([900, 500, 100]), **kwargs)
    name, attn = next((n, m) for n, m in student.named_modules() if isinstance(getattr(m, "processor", None),
                                                                              QuantAttnProcessor))
    channels = attn.to_q.in_features
    hidden = torch.randn(3, channels, 4, 4, generator=torch.Generator().manual_seed(2))

    def run(chunk_mb):
        set_attention_chunk(student, chunk_mb)
        student.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_()
        set_step(student, STEPS)
        extra = {}
        if attn.is_cross_attention:
            extra["encoder_hidden_states"] = kwargs["encoder_hidden_states"]
        out = attn(h, **extra)
        set_step(student, None)
        (out * torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        return out.detach(), h.grad, grads

    heads_batch = 3 * attn.heads
    kv = 16 if not attn.is_cross_attention else 5
    want, want_input, want_grads = run(None)
    assert any("probs_quantizer" in n for n in want_grads) and any("to_q.weight" in n for n in want_grads)
    for rows in (1, 5):  # 16 queries: 16 chunks, and 5 + 5 + 5 + 1
        got, got_input, got_grads = run(rows * heads_batch * kv * 4 / 2**20)
        assert torch.equal(got, want), name
        _assert_same_gradient(got_input, want_input)
        assert got_grads.keys() == want_grads.keys()
        for key in want_grads:
            _assert_same_gradient(got_grads[key], want_grads[key], msg=key)


def test_chunk_budget_is_checked():
    with pytest.raises(ValueError, match="positive number of MiB"):
        set_attention_chunk(torch.nn.Linear(2, 2), 0)


def test_rotary_embedding_matches_diffusers_bitwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 8, generator=g)  # [B, L, H, d]
    cos, sin = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    assert torch.equal(apply_rotary(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))


def test_joint_layout_is_tiled_alike():
    """QuantJointAttnProcessor's q, k, v are [B, H, L, d]: the chunks slice the query axis the same way."""
    quantizer = _probs_quantizer()
    q, k, v = (t.detach().reshape(3, 2, -1, D) for t in _inputs())
    quantizer.step = STEPS
    with torch.no_grad():
        assert torch.equal(attend(q, k, v, D**-0.5, quantizer, None, _budget(3)),
                           attend(q, k, v, D**-0.5, quantizer, None, None))

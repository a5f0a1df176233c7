"""The quantization core: pure ops, Weight Dilation, TPQ quantizers, quantized layers and attention, the
converter and the student's saved state. Imports torch only (no Lightning, Hydra, diffusers or dq.arch: a
model's architecture description is handed to `quantize_model` by its caller)."""

from dq.quant.attention import (
    DEFAULT_ATTENTION_CHUNK_MB,
    QuantAttnProcessor,
    QuantJointAttnProcessor,
    set_attention_chunk,
)
from dq.quant.config import QuantConfig
from dq.quant.convert import (
    ModelLayout,
    act_quantizers,
    activation_drop,
    calibrate_activations,
    drop_lowrank,
    drop_lowrank_absent,
    is_quantized,
    lowrank_layers,
    merge_observations,
    quant_config,
    quantize_model,
    set_lowrank_scale,
    set_quant_enabled,
    set_step,
    step_context,
    step_indexed,
    tpq_num_steps,
    weight_quantizers,
)
from dq.quant.dilation import apply_dilation, dilation_scale
from dq.quant.layers import QuantConv2d, QuantLinear
from dq.quant.ops import (
    fake_quantize,
    fake_quantize_per_channel,
    fake_quantize_per_sample,
    gather_per_sample,
    mse_search_range,
    percentile_range,
    qparams_from_range,
    round_ste,
    step_groups,
)
from dq.quant.quantizers import (
    MIN_STEP_SIZE,
    StepBlend,
    StepIndexed,
    TemporalActQuantizer,
    TokenActQuantizer,
    WeightQuantizer,
)
from dq.quant.state import load_quant_state, read_quant_state, save_quant_state
from dq.quant.timesteps import POLICIES as TPQ_POLICIES
from dq.quant.timesteps import TimestepKeying, key_by_timestep, timestep_keying

__all__ = [
    "DEFAULT_ATTENTION_CHUNK_MB",
    "MIN_STEP_SIZE",
    "ModelLayout",
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantConv2d",
    "QuantJointAttnProcessor",
    "QuantLinear",
    "StepBlend",
    "StepIndexed",
    "TPQ_POLICIES",
    "TimestepKeying",
    "TemporalActQuantizer",
    "TokenActQuantizer",
    "WeightQuantizer",
    "act_quantizers",
    "activation_drop",
    "apply_dilation",
    "calibrate_activations",
    "dilation_scale",
    "drop_lowrank",
    "drop_lowrank_absent",
    "fake_quantize",
    "fake_quantize_per_channel",
    "fake_quantize_per_sample",
    "gather_per_sample",
    "is_quantized",
    "key_by_timestep",
    "load_quant_state",
    "lowrank_layers",
    "merge_observations",
    "mse_search_range",
    "percentile_range",
    "qparams_from_range",
    "quant_config",
    "quantize_model",
    "read_quant_state",
    "round_ste",
    "save_quant_state",
    "set_attention_chunk",
    "set_lowrank_scale",
    "set_quant_enabled",
    "set_step",
    "step_context",
    "step_indexed",
    "step_groups",
    "timestep_keying",
    "tpq_num_steps",
    "weight_quantizers",
]

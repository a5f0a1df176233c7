"""diffusers' `Attention` modules of a model: their names, and their per-module head counts (read them, and set
counts a UNet config cannot express: LSUN-Church's 8 heads at every width; `dq.zoo.convert_compvis` writes them
to `unet/attention_heads.json`). Their quantized processors are dq.quant.attention's."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from dq.errors import UserError


def attention_heads(unet: nn.Module) -> dict[str, int]:
    """{name of each diffusers Attention module: its head count}."""
    from diffusers.models.attention_processor import Attention

    return {name: int(m.heads) for name, m in unet.named_modules() if isinstance(m, Attention)}


def attention_modules(model: nn.Module) -> tuple[str, ...]:
    """The names of the diffusers Attention modules of `model`, in named_modules order."""
    from diffusers.models.attention_processor import Attention

    return tuple(name for name, m in model.named_modules() if isinstance(m, Attention))


def set_attention_heads(unet: nn.Module, heads: Mapping[str, int]) -> None:
    """Give the named diffusers Attention modules these head counts (their projections are unchanged: only
    the split into heads and the 1/sqrt(head size) scale depend on it). ValueError for a name that is not an
    attention module or a count that does not divide its width."""
    from diffusers.models.attention_processor import Attention

    for name, count in heads.items():
        try:
            module = unet.get_submodule(name)
        except AttributeError as err:
            raise UserError(f"attention heads given for {name!r}, which is not a module of this UNet") from err
        if not isinstance(module, Attention):
            raise UserError(f"attention heads given for {name!r}, a {type(module).__name__}, not an Attention module")
        if not isinstance(count, int) or count < 1 or module.inner_dim % count:
            raise UserError(f"{name}: {count!r} heads do not split its {module.inner_dim} channels")
        module.heads = module.sliceable_head_dim = count
        if module.scale_qk:
            module.scale = (module.inner_dim // count) ** -0.5

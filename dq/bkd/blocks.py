"""Blocks of a diffusion model for Block-wise Knowledge Distillation (docs/method.md §4, eq. 15), and the
capture of one block's inputs and output from a full-model forward pass.

A block is a module called exactly once per forward pass; the model's architecture description
(dq.arch.describe) lists them in execution order, which is the order BKD trains them in. A UNet's blocks:
each resnet, each attention module, each down/up-sampler, the timestep embedding, conv_in and conv_out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from dq.arch import describe
from dq.errors import UserError
from dq.quant import act_quantizers, step_context, weight_quantizers
from dq.sampling import unet_forward

WHOLE_MODEL = ""  # the block name of the whole model (end-to-end QAT as one block)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors a block returns, in order: a tensor, the tensors of a tuple (a transformer block may
    return (encoder_hidden_states, hidden_states); None elements are skipped), or an output dataclass's
    `sample`. BKD matches every one of them to the teacher's."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        tensors = [t for t in output if isinstance(t, torch.Tensor)]
        if tensors:
            return tensors
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        return [output.sample]
    raise TypeError(f"cannot find the output tensors of a block returning {type(output).__name__}")


def _has_quantizers(module: nn.Module) -> bool:
    return bool(act_quantizers(module) or weight_quantizers(module))


def candidate_blocks(student: nn.Module) -> list[str]:
    """The blocks of a student that hold quantizers, in execution order (from its architecture description;
    UnsupportedError for a model no description knows)."""
    return [n for n in describe(student, required=True).blocks if _has_quantizers(student.get_submodule(n))]


def check_block_order(model: nn.Module, names: list[str], example: dict[str, torch.Tensor]) -> None:
    """UserError unless a forward of `model` on `example` runs the blocks `names` each once, in this order
    (an architecture description that does not match the model's forward pass)."""
    order = execution_order(model, names, example)
    if order != names:
        first = next(i for i, (a, b) in enumerate(zip(order, names)) if a != b)
        raise UserError(
            f"the architecture description of {type(model).__name__} lists block {names[first]!r} at position "
            f"{first}, but the forward pass runs {order[first]!r} there; the description is wrong for this model"
        )


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted block has run."""


def execution_order(model: nn.Module, names: Iterable[str], example: dict[str, torch.Tensor]) -> list[str]:
    """`names` sorted by when each block first runs in a forward pass of `model` on `example` (a
    calibration batch with x_t, timestep, step and optionally cond). Every block must run exactly once.
    Run it on the FP teacher: the student's blocks share its module names, and its quantizers may not be
    calibrated yet."""
    names = list(names)
    calls: dict[str, int] = {}
    order: list[str] = []

    def hook_for(name: str):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            run_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in calls]
    repeated = [n for n, c in calls.items() if c > 1]
    if missing or repeated:
        raise UserError(f"BKD needs every block to run once per forward; never ran: {missing}, ran twice: {repeated}")
    return order


def run_model(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One UNet forward on a calibration batch, with the batch's per-sample step indices set."""
    with step_context(model, batch["step"]):
        return unet_forward(model, batch["x_t"], batch["timestep"], batch.get("cond"))


@dataclass
class BlockIO:
    """The captured inputs of a block call (args/kwargs as a flattened pytree) and its output tensors."""

    leaves: list[Any]  # tensors with a leading batch dimension, shared tensors, or constants
    spec: pytree.TreeSpec
    output: list[torch.Tensor] | None  # every tensor the block returns (output_tensors), or None
    shared: frozenset[int] = frozenset()  # indices of tensor leaves with no batch dimension (one copy for all)
    # per tensor leaf (by index), the order of its dimensions in memory when it was captured, outermost
    # first, where that is not the plain order (an attention output comes channels-last); the cache itself
    # is contiguous
    layouts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # per tensor leaf (by index) stored in another dtype than the block computes in (bf16 caches,
    # method.distill.cache_dtype), the dtype it was captured in: `run` gives the block that one back
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)

    def call(self, block: nn.Module, index: torch.Tensor | slice | None = None) -> list[torch.Tensor]:
        """Run `block` on the captured inputs (rows `index` of every batched tensor; shared tensors whole),
        moved to the block's device (the cache may live on the CPU while the block trains on a GPU)."""
        return output_tensors(self.run(block, index))

    def run(self, block: nn.Module, index: torch.Tensor | slice | None = None, as_captured: bool = False) -> Any:
        """As `call`, but the block's return value as it is (a tensor, a tuple, an output class). as_captured:
        the inputs in the memory layout they had in the forward pass (kernels may round differently on
        another layout), so that the output is bitwise the one that pass would compute."""
        device = next(block.parameters()).device
        leaves = [
            (leaf if index is None or i in self.shared else leaf[index]).to(device, self.dtypes.get(i), non_blocking=True)
            if isinstance(leaf, torch.Tensor) else leaf
            for i, leaf in enumerate(self.leaves)
        ]
        if as_captured:
            for i, order in self.layouts.items():
                leaf = leaves[i]
                leaves[i] = torch.empty_permuted(leaf.shape, order, dtype=leaf.dtype, device=leaf.device).copy_(leaf)
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        if isinstance(kwargs.get("batch_size"), int):  # PixArt's adaLN-single: the rows run now, not at capture
            batched = [leaf for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and i not in self.shared]
            if batched:
                kwargs["batch_size"] = int(batched[0].shape[0])
        return block(*args, **kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every captured tensor: the batched inputs, then the output when there is one."""
        tensors = [leaf for leaf in self.leaves if isinstance(leaf, torch.Tensor)]
        return tensors if self.output is None else [*tensors, *self.output]

    @property
    def device(self) -> torch.device:
        """Where the captured tensors live (all on one device, as `to` and dq.bkd.store leave them)."""
        tensors = self.tensors()
        return tensors[0].device if tensors else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        """The memory the captured tensors take."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> BlockIO:
        """The same inputs and output on `device` (tensors already there are not copied)."""
        leaves = [leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        return BlockIO(leaves, self.spec, None if self.output is None else [t.to(device) for t in self.output],
                       self.shared, self.layouts, self.dtypes)


def _run_until_stopped(model: nn.Module, batch: dict[str, torch.Tensor], handles: list) -> None:
    """One forward of `model` on `batch` that a hook may end early (_StopForward); the hooks are removed."""
    try:
        run_model(model, batch)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def capture_block(
    model: nn.Module, block_name: str, batch: dict[str, torch.Tensor], want_output: bool
) -> BlockIO:
    """Run `model` on `batch` up to block `block_name` and return the block's inputs, and its output when
    want_output (then the block runs; otherwise the pass stops before it). Later blocks never run."""
    captured: dict[str, Any] = {}

    def before(module, args, kwargs):
        captured["inputs"] = (args, kwargs)
        if not want_output:
            raise _StopForward

    def after(module, args, kwargs, output):
        captured["output"] = output_tensors(output)
        raise _StopForward

    block = model if block_name == WHOLE_MODEL else model.get_submodule(block_name)  # the model: its own call
    handles = [block.register_forward_pre_hook(before, with_kwargs=True)]
    if want_output:
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    _run_until_stopped(model, batch, handles)
    if "inputs" not in captured:
        raise RuntimeError(f"block {block_name!r} did not run in the forward pass")
    return block_io(model, captured["inputs"], captured.get("output"))


def block_io(model: nn.Module, inputs: tuple[tuple, dict], output: list[torch.Tensor] | None) -> BlockIO:
    """The BlockIO of a block call of `model` with (args, kwargs) `inputs`: the keyword inputs the model's
    description names shared (no batch dimension) are marked so."""
    with_paths, spec = pytree.tree_flatten_with_path(inputs)
    shared_names = set(describe(model).shared_inputs)
    shared = frozenset(i for i, (path, leaf) in enumerate(with_paths) if isinstance(leaf, torch.Tensor)
                       and any(isinstance(k, pytree.MappingKey) and k.key in shared_names for k in path))
    leaves = [leaf for _, leaf in with_paths]
    return BlockIO(leaves, spec, output, shared, memory_layouts(leaves))


def memory_layouts(leaves: list[Any]) -> dict[int, tuple[int, ...]]:
    """For each dense tensor leaf not laid out in its plain dimension order, the order of its dimensions in
    memory (outermost first: (0, 2, 3, 1) for channels-last)."""
    layouts = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 1 and not leaf.is_contiguous():
            order = tuple(sorted(range(leaf.dim()), key=lambda d: -leaf.stride(d)))
            if _dense_strides(leaf.shape, order) == leaf.stride():  # dense: a permutation of the plain layout
                layouts[i] = order
    return layouts


def _dense_strides(shape: torch.Size, order: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a dense tensor of `shape` whose dimensions lie in memory in `order` (outermost first)."""
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


def capture_outputs(model: nn.Module, names: list[str], batch: dict[str, torch.Tensor],
                    keep: Iterable[str] | None = None) -> Any:
    """Run `model` on `batch` once and return the output tensors of the blocks `names` (in execution order);
    the pass stops after the last of them. The same values as one capture_block per name: a forward stopped
    early computes its prefix exactly as a full one does. keep: also return, as (outputs, shapes, values),
    each block's return value's shapes (`BlockReplay.shapes_of`) and, for the blocks in `keep`, a host copy
    of the value itself (`BlockReplay.stored`: code after a block may change its output in place)."""
    outputs: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, Any] = {}
    values: dict[str, Any] = {}
    kept = None if keep is None else set(keep)
    last = names[-1]

    def hook_for(name: str):
        def hook(module, args, output):
            outputs[name] = output_tensors(output)
            if kept is not None:
                shapes[name] = BlockReplay.shapes_of(output)
                if name in kept:
                    values[name] = BlockReplay.stored(output)
            if name == last:
                raise _StopForward

        return hook

    _run_until_stopped(model, batch, [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names])
    missing = [n for n in names if n not in outputs]
    if missing:
        raise RuntimeError(f"blocks {missing} did not run in the forward pass")
    return outputs if kept is None else (outputs, shapes, values)


def same_block_io(a: BlockIO, b: BlockIO) -> bool:
    """Whether two captures hold bitwise the same inputs (and outputs, when both have them)."""
    if a.spec != b.spec or len(a.leaves) != len(b.leaves):
        return False
    for x, y in zip(a.leaves, b.leaves):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y):
            return False
    if a.output is not None and b.output is not None:
        return len(a.output) == len(b.output) and all(map(torch.equal, a.output, b.output))
    return True


def block_readers(model: nn.Module, names: list[str], example: dict[str, torch.Tensor]) -> dict[str, frozenset[int]]:
    """For each block of `names` (in execution order), the positions in `names` of the blocks whose inputs the
    code between blocks computes from its output (blocks no other block reads are left out).

    One forward of `model` on `example` with autograd on: every block's output tensors are replaced by fresh
    leaves, so that the graph behind a block's inputs ends at the outputs of the blocks it reads directly (a
    value that passes through another block is that block's output). A read autograd cannot see (a
    comparison, an integer op) is missed: BlockDistiller checks what it skips on the first chunk."""
    index = {name: i for i, name in enumerate(names)}
    leaf_owner: dict[int, int] = {}  # id of an output leaf -> position of its block
    kept: list[torch.Tensor] = []  # the leaves, alive while their ids are used
    readers: dict[int, set[int]] = {}

    def owners_of(tensors: list[torch.Tensor]) -> set[int]:
        owners, seen, stack = set(), set(), []
        for t in tensors:
            if id(t) in leaf_owner:
                owners.add(leaf_owner[id(t)])
            elif t.grad_fn is not None:
                stack.append(t.grad_fn)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None and id(variable) in leaf_owner:
                owners.add(leaf_owner[id(variable)])
            stack.extend(n for n, _ in node.next_functions if n is not None)
        return owners

    def pre_hook_for(name: str):
        def hook(module, args, kwargs):
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            for owner in owners_of(tensors):
                readers.setdefault(owner, set()).add(index[name])

        return hook

    def hook_for(name: str):
        def fresh(t):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                leaf = t.detach().requires_grad_(True)
                leaf_owner[id(leaf)] = index[name]
                kept.append(leaf)
                return leaf
            return t

        return lambda module, args, output: pytree.tree_map(fresh, output)

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre_hook_for(name), with_kwargs=True))
        handles.append(module.register_forward_hook(hook_for(name)))
    with torch.enable_grad():
        _run_until_stopped(model, example, handles)
    return {names[j]: frozenset(r) for j, r in readers.items()}


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module, names: Iterable[str]):
    """Within: each block of `model` in `names` runs under activation checkpointing: a forward keeps only the
    block's inputs for backward, and backward reruns the block (with the TPQ steps its forward had) to get
    what it needs. The end-to-end stage then holds one block's activations at a time, not the whole
    model's. Values and gradients are those of the plain forward (the same operations run again); a block
    whose quantizers draw random masks (activation drop) must not be recomputed: its masks would differ."""
    from torch.utils.checkpoint import checkpoint

    from dq.quant import step_indexed

    def restoring(quantizers: list, steps: list):
        @contextlib.contextmanager
        def restore():
            saved = [q.step for q in quantizers]
            for q, step in zip(quantizers, steps):
                q.step = step
            try:
                yield
            finally:
                for q, step in zip(quantizers, saved):
                    q.step = step

        return restore

    def wrapped(module: nn.Module):
        forward, quantizers = module.forward, step_indexed(module)

        def run(*args, **kwargs):
            restore = restoring(quantizers, [q.step for q in quantizers])
            return checkpoint(forward, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), restore()), **kwargs)

        return run

    with patched_forwards(model, {name: wrapped(model.get_submodule(name)) for name in names}):
        yield


@contextlib.contextmanager
def patched_forwards(model: nn.Module, forwards: dict[str, Any]):
    """Within: each submodule of `model` named in `forwards` runs that function as its forward; restored on
    exit (a module's own instance attribute put back, else the class's forward)."""
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for name, forward in forwards.items():
            module = model.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own


_CONSTANT = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class _TensorShape:
    """What a stand-in for a tensor needs: shape, dtype and memory layout."""

    shape: torch.Size
    dtype: torch.dtype
    order: tuple[int, ...]

    @staticmethod
    def of(t: torch.Tensor) -> _TensorShape:
        layout = memory_layouts([t]).get(0, tuple(range(t.dim())))
        return _TensorShape(t.shape, t.dtype, layout)


def nbytes_of(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


class BlockReplay:
    """What blocks returned on every calibration chunk, so that a later pass over the same chunk need not run
    them: a frozen block gives the same output on the same inputs. The student's prefix passes (build_cache)
    replay its trained blocks, the teacher's target passes replay the teacher's earlier blocks, and a pass
    then costs the code between blocks, not the blocks: each block's outputs are carried forward to the
    blocks that read them.

    Per block and capture chunk it keeps the output as the block returned it (its tuple or output class) while
    a later block reads it ("outputs"): in host memory, or in memory-mapped files on disk ("disk", via an
    allocator of dq.bkd.store) once the host's share is spent; and always its shapes, dtypes and memory
    layouts ("shapes"), for a stand-in of zeros where no block still to run reads the value, and to give a
    value kept on disk its layout back. A block with neither runs: what is kept changes what a pass costs,
    never what it computes."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[Any]] = {}
        self.shapes: dict[str, list[Any]] = {}
        self.on_disk: set[str] = set()  # blocks whose kept values live in memory-mapped files

    @property
    def total_bytes(self) -> int:
        """The bytes of every kept value, on the host and on disk."""
        return sum(nbytes_of(chunks) for chunks in self.outputs.values())

    @property
    def host_bytes(self) -> int:
        """The bytes of the values kept in host memory."""
        return sum(nbytes_of(chunks) for name, chunks in self.outputs.items() if name not in self.on_disk)

    @property
    def disk_bytes(self) -> int:
        return self.total_bytes - self.host_bytes

    @staticmethod
    def replayable(output: Any) -> bool:
        """Whether a block's return value can be stored and rebuilt (tensors and constants in a pytree)."""
        return all(isinstance(leaf, (torch.Tensor, *_CONSTANT)) for leaf in pytree.tree_leaves(output))

    @staticmethod
    def shapes_of(output: Any) -> Any:
        """A block's return value with every tensor replaced by its shape, dtype and layout."""
        return pytree.tree_map(lambda t: _TensorShape.of(t) if isinstance(t, torch.Tensor) else t, output)

    @staticmethod
    def stored(output: Any, allocate=None, copy: bool = True) -> Any:
        """A block's return value to keep: on the host (copy: a CPU value is copied too, so that code after the
        block cannot change it in place), or, given `allocate` (dq.bkd.store.tier_allocator), in tensors it
        allocates (contiguous; `replaying` gives them their layout back)."""
        def keep(t):
            if not isinstance(t, torch.Tensor):
                return t
            if allocate is None:
                return t.detach().to("cpu", copy=copy)
            return allocate(tuple(t.shape), t.dtype).copy_(t.detach())

        return pytree.tree_map(keep, output)

    def record(self, name: str, shapes: list[Any], outputs: list[Any] | None, on_disk: bool = False) -> None:
        """Block `name`'s output shapes (shapes_of), one per capture chunk in order, and its output values
        (`stored`) when they are to be kept; on_disk: the values are in memory-mapped files."""
        self.shapes[name] = shapes
        if outputs is not None:
            self.outputs[name] = outputs
            if on_disk:
                self.on_disk.add(name)

    def drop(self, name: str) -> None:
        """Forget block `name`'s output values (its shapes stay); a disk value's file goes with it."""
        self.outputs.pop(name, None)
        self.on_disk.discard(name)

    def drop_read_by(self, readers: dict[str, frozenset[int]], position: int) -> None:
        """Forget the values no block after `position` reads (readers: dq.bkd.blocks.block_readers)."""
        for name in list(self.outputs):
            if max(readers.get(name, frozenset()), default=-1) <= position:
                self.drop(name)

    def standins(self, blocks: list[str], readers: dict[str, frozenset[int]], k: int) -> set[str]:
        """The blocks before block k (of `blocks`, in execution order) that may return zeros in a pass that
        stops at block k: their shapes are recorded, and every block that reads their output comes before
        block k and does not run (it replays its output or is a stand-in itself). Decided from the last block
        backwards, so that a block that must run keeps the blocks it reads running or replayed."""
        standins, running = set(), set()
        for j in reversed(range(k)):
            name = blocks[j]
            if name in self.outputs:
                continue
            block_readers = readers.get(name, frozenset())
            if name in self.shapes and all(r < k and blocks[r] not in running for r in block_readers):
                standins.add(name)
            else:
                running.add(name)
        return standins

    @contextlib.contextmanager
    def replaying(self, model: nn.Module, chunk: int, device: torch.device, standins: Iterable[str] = ()):
        """Within: every block of `model` with a kept output returns it for capture chunk `chunk` (a copy on
        `device` in the layout the block returned it in, so that code after it may change it in place), and
        the blocks `standins` return zeros of their output's shapes, all without running."""

        def restored(t, shape):
            if not isinstance(t, torch.Tensor):
                return t
            if isinstance(shape, _TensorShape) and shape.order != tuple(range(t.dim())):
                return torch.empty_permuted(shape.shape, shape.order, dtype=shape.dtype, device=device).copy_(t)
            return t.to(device, copy=True)

        def zeros(t):
            if isinstance(t, _TensorShape):
                return torch.empty_permuted(t.shape, t.order, dtype=t.dtype, device=device).zero_()
            return t

        def returning(name: str):
            value, shapes = self.outputs[name][chunk], self.shapes[name][chunk]
            return lambda *args, **kwargs: pytree.tree_map(restored, value, shapes)

        def standing_in(name: str):
            shapes = self.shapes[name][chunk]
            return lambda *args, **kwargs: pytree.tree_map(zeros, shapes)

        replacements = {name: returning(name) for name in self.outputs}
        replacements.update({name: standing_in(name) for name in standins})
        with patched_forwards(model, replacements):
            yield

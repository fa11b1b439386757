"""Long context on one card: offloaded checkpoints and the MLP computed in sequence tiles.

Two autograd functions that keep device memory from growing with the number of layers or with the MLP's width:

- **Offloaded checkpoints** (`OffloadedCheckpoint`, a decoder layer's mode 'offload'): a checkpointed layer keeps
  only its input hidden state for the backward pass; here that input goes to pinned host memory (copied on a side
  stream on CUDA, so the copy overlaps the next layers' compute), and the backward pass copies it back before the
  layer is recomputed, starting the copy of the layer below at the same time (prefetch). The device then holds the
  activations of the one layer being recomputed and one prefetched input, not one input per layer. The layer is
  recomputed with the random generator's and autocast's state of its forward, so dropout masks and dtypes are the
  same and so are the gradients. On the CPU the "host" copy is a copy on the same device: the path, the accounting
  (`HostCopies`) and the numerics are the same.
- **Tiled MLP** (`TiledMLP`, `sequence_tiling`): the MLP (gate, up, SwiGLU, down and their LoRA branches, lean or
  peft's) runs one tile of tokens at a time, without keeping anything but its input; backward recomputes each tile
  and backpropagates it before the next, so no [tokens x intermediate] tensor is ever whole (ALST's TiledMLP). The
  attention projections are not tiled: what they keep is rank-r per token and the q/k/v the attention kernel keeps
  anyway. With dropout, the tiles draw their masks tile by tile (the same distribution as one draw over the whole
  sequence, not the same values); backward replays each tile's mask exactly.

`apply_offload(layer)` makes a decoder layer's checkpointing the offloaded kind (model.apply_checkpoint_plan calls
it for the plan's 'offload' layers); `apply_tiling(model, tile_tokens)` tiles every decoder layer's MLP (call it after
lean_activations.apply, whose forward it wraps). contract/memory.py models both (device and host bytes apart).
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

# --- offloaded checkpoints ---------------------------------------------------------------------------------


@dataclass
class HostCopies:
    """What this process has in host memory for offloaded layers now, and the most it had (bytes)."""

    live: int = 0
    peak: int = 0
    copies: int = 0  # how many layer inputs were offloaded since the last reset

    def add(self, n: int) -> None:
        self.live += n
        self.copies += 1
        self.peak = max(self.peak, self.live)

    def reset(self) -> None:
        self.live, self.peak, self.copies = 0, 0, 0


HOST = HostCopies()


def _side_stream(device: torch.device) -> Any:
    """One copy stream per CUDA device (the copies of every layer are ordered on it)."""
    streams = _side_stream.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


@dataclass(eq=False)
class _Stash:
    """One offloaded layer input: its host copy, and once prefetched its device copy and the event that says the copy
    is done. `below`: the stash of the layer under this one in the same forward pass (the next to be recomputed)."""

    host: torch.Tensor
    device: torch.device
    ready: Any = None  # CUDA event after the device-to-host copy (or the host-to-device prefetch)
    fetched: torch.Tensor | None = None
    below: Any = None  # weakref to the previous layer's _Stash
    used: bool = False
    nbytes: int = field(default=0)

    def free(self) -> None:
        if not self.used:
            self.used = True
            HOST.live -= self.nbytes
        self.host = torch.empty(0)
        self.fetched = None

    def __del__(self) -> None:  # a graph dropped without backward (an error, an evaluation under grad) frees its copy
        if not self.used:
            HOST.live -= self.nbytes


# The stash of the layer that ran last in this process: the next offloaded layer links to it (its prefetch target).
_LAST: list[Any] = [None]


def _offload(x: torch.Tensor) -> _Stash:
    """Copy `x` to host memory: pinned and on the side stream on CUDA (the caller's stream waits for nothing)."""
    if x.is_cuda:
        stream, current = _side_stream(x.device), torch.cuda.current_stream(x.device)
        stream.wait_stream(current)  # x is complete before the copy starts
        with torch.cuda.stream(stream):
            host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            host.copy_(x, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        x.record_stream(stream)  # the allocator must not reuse x's memory before the copy has read it
        stash = _Stash(host, x.device, ready)
    else:
        stash = _Stash(x.detach().clone(), x.device)
    stash.nbytes = x.numel() * x.element_size()
    HOST.add(stash.nbytes)
    return stash


def _prefetch(stash: _Stash) -> None:
    """Start copying the stash back to its device (on CUDA on the side stream, after its own offload copy)."""
    if stash.used or stash.fetched is not None:
        return
    if stash.device.type == "cuda":
        stream = _side_stream(stash.device)
        with torch.cuda.stream(stream):
            stream.wait_event(stash.ready)
            stash.fetched = stash.host.to(stash.device, non_blocking=True)
            stash.ready = torch.cuda.Event()
            stash.ready.record(stream)
    else:
        stash.fetched = stash.host.clone()


def _fetch(stash: _Stash) -> torch.Tensor:
    """The layer's input back on its device, waiting for the prefetch (or copying now if none was started)."""
    _prefetch(stash)
    x = stash.fetched
    assert x is not None
    if stash.device.type == "cuda":
        current = torch.cuda.current_stream(stash.device)
        current.wait_event(stash.ready)
        x.record_stream(current)  # made on the side stream, used and freed on this one
    stash.free()
    return x


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class OffloadedCheckpoint(torch.autograd.Function):
    """``run(x)`` (a decoder layer's forward with its keyword arguments bound) without keeping anything on the
    device: its input goes to host memory, and backward recomputes the layer from it. `params`: the layer's trainable
    parameters, inputs here so that the output requires grad even where `x` does not (layer 0), and so that their
    gradients come back through this function (as the gradients of any other function's inputs)."""

    @staticmethod
    def forward(ctx: Any, run: Any, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device = x.device
        ctx.run, ctx.params, ctx.rng = run, params, _rng_states(device)
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        stash = _offload(x)
        last = _LAST[0]() if _LAST[0] is not None else None
        stash.below = weakref.ref(last) if last is not None and not last.used else None
        _LAST[0] = weakref.ref(stash)
        ctx.stash = stash
        out = run(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"an offloaded layer must return a tensor, not {type(out).__name__}")
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        stash: _Stash = ctx.stash
        x = _fetch(stash)
        below = stash.below() if stash.below is not None else None
        if below is not None:
            _prefetch(below)  # copied while this layer is recomputed and backpropagated
        ctx.stash = None
        device = x.device
        inputs = [x.detach().requires_grad_(ctx.needs_input_grad[1])]
        cpu_rng, cuda_rng = ctx.rng
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(inputs[0])
        targets = ([inputs[0]] if ctx.needs_input_grad[1] else []) + list(ctx.params)
        wanted = [t for t in targets if t.requires_grad]
        grads = torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ()
        by_id = {id(t): g for t, g in zip(wanted, grads, strict=True)}
        grad_x = by_id.get(id(inputs[0])) if ctx.needs_input_grad[1] else None
        return (None, grad_x, *(by_id.get(id(p)) for p in ctx.params))


def offloaded_checkpoint(layer: torch.nn.Module, run: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """What transformers calls as a layer's ``_gradient_checkpointing_func(partial(forward, **kwargs), hidden)``."""
    if args:
        raise TypeError("an offloaded layer takes its hidden states as its one positional argument")
    return OffloadedCheckpoint.apply(run, x, *(p for p in layer.parameters() if p.requires_grad))


def apply_offload(layer: torch.nn.Module) -> None:
    """Make `layer` (a transformers GradientCheckpointingLayer, checkpointing on) an offloaded one."""
    layer._gradient_checkpointing_func = partial(offloaded_checkpoint, layer)


# --- tiled MLP ---------------------------------------------------------------------------------------------


def _tiles(n: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, n)) for start in range(0, n, tile)]


class TiledMLP(torch.autograd.Function):
    """``mlp(x)`` for x [rows, tokens, hidden], computed `tile` tokens at a time; keeps only x (and the generator's
    state); backward recomputes and backpropagates one tile at a time, summing the parameters' gradients."""

    @staticmethod
    def forward(ctx: Any, run: Any, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device = x.device
        ctx.run, ctx.tile, ctx.params, ctx.rng = run, tile, params, _rng_states(device)
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(x)
        return torch.cat([run(x[:, start:end]) for start, end in _tiles(x.shape[1], tile)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        device = x.device
        need_x = ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(ctx.params)
        cpu_rng, cuda_rng = ctx.rng
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            torch.set_rng_state(cpu_rng)  # the tiles draw their dropout masks again in the same order
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
            for start, end in _tiles(x.shape[1], ctx.tile):
                piece = x[:, start:end].detach().requires_grad_(need_x)
                with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
                    out = ctx.run(piece)
                inputs = ([piece] if need_x else []) + [p for p in ctx.params if p.requires_grad]
                grads = list(torch.autograd.grad(out, inputs, grad[:, start:end], allow_unused=True))
                if need_x:
                    assert grad_x is not None
                    got = grads.pop(0)
                    grad_x[:, start:end] = got if got is not None else 0
                trainable = iter(grads)
                for i, p in enumerate(ctx.params):
                    if p.requires_grad:
                        g = next(trainable)
                        if g is not None:
                            grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        return (None, None, grad_x, *grad_params)


def tiled_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward (`untiled_forward`: lean or its class's) over tiles of `tile_tokens` tokens."""
    inner, tile = self.__dict__["untiled_forward"], self.__dict__["tile_tokens"]
    if x.dim() != 3 or x.shape[1] <= tile:
        return inner(x)
    if not torch.is_grad_enabled():
        return torch.cat([inner(x[:, start:end]) for start, end in _tiles(x.shape[1], tile)], dim=1)
    params = tuple(p for p in self.parameters() if p.requires_grad)
    return TiledMLP.apply(inner, tile, x, *params)


def apply_tiling(model: torch.nn.Module, tile_tokens: int | None) -> int:
    """Tile the MLP of every decoder layer of `model` along the sequence (`tile_tokens` a tile), or untile it (None).
    Wraps the MLP's forward as it is now (lean_activations.apply first). Returns how many MLPs are tiled."""
    from worker.training.model import decoder_layers

    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        if "untiled_forward" in mlp.__dict__:  # back to the forward it had before tiling
            inner = mlp.__dict__.pop("untiled_forward")
            mlp.__dict__.pop("tile_tokens", None)
            current = mlp.__dict__.get("forward")
            if getattr(current, "__func__", None) is not tiled_mlp_forward:
                pass  # replaced since (lean_activations.apply switched it): that forward stays
            elif getattr(inner, "__self__", None) is mlp and getattr(inner, "__func__", None) is type(mlp).forward:
                mlp.__dict__.pop("forward", None)
            else:
                mlp.forward = inner
        if tile_tokens is not None:
            if tile_tokens < 1:
                raise ValueError("tile_tokens must be positive")
            mlp.__dict__["untiled_forward"] = mlp.forward
            mlp.__dict__["tile_tokens"] = tile_tokens
            mlp.forward = types.MethodType(tiled_mlp_forward, mlp)
            count += 1
    return count


def tiled(model: torch.nn.Module) -> bool:
    from worker.training.model import decoder_layers

    return any("untiled_forward" in getattr(layer, "mlp", torch.nn.Module()).__dict__ for layer in decoder_layers(model))

"""Lean activations: the same decoder layer, fewer bytes kept for the backward pass (`lean_activations`).

What an unchecked Llama layer keeps per token is mostly copies that are cheap to rebuild. Autograd
functions keep only what is expensive to rebuild (or kept anyway) and redo the rest in the backward pass:

- **LoRA** (`LoraBranch`): peft's ``lora_B(lora_A(dropout(x)))`` keeps, per adapted module, the dropout output
  and its mask: 3 bytes per input element, seven times a layer. Here the branch keeps the rank-r ``x A^T``, the
  state of the random generator and what rebuilds ``x``: for q/k/v and gate/up, whose ``x`` is a norm's output,
  the norm's input and scale (kept by the norm anyway); for down_proj gate and up (kept by SwiGLU); for o_proj its
  input (the attention output, kept by the attention kernel anyway). Backward replays the same dropout mask with
  the same kernel (``torch.native_dropout``, which is what ``nn.Dropout`` runs), so the result equals peft's.
- **RMSNorm** (`RMSNormFunction`): transformers' norm keeps an fp32 copy of its input (4 bytes per element);
  here the compute-dtype input (2 bytes) and the per-token scale, the fp32 math redone in backward.
- **SwiGLU** (`SwiGLUFunction`): ``silu(gate) * up`` keeps gate, silu(gate) and up; here gate and up, with
  silu redone in backward by the same kernels autograd uses (bitwise the same gradients).

For Llama-3-8B (LoRA r=16 on all seven linears, dropout 0.05, bf16) that is 256,360 -> 94,568 bytes per token
and layer (`contract/memory.py` models both). More layers then fit without checkpointing under the same memory budget
(`gradient_checkpointing=auto`), which is where the speed comes from: no layer is recomputed that fits.

Redoing work costs memory traffic, so the rest is about moving fewer bytes (``bench/traffic.py`` counts them):
a norm or SwiGLU output feeding several branches is rebuilt once in backward, not once per branch (`_RebuiltOutput`);
each branch adds itself to the base layer's output inside its matmul (``addmm``, the scaling folded into the
small B); on a 4-bit base the branch runs the base layer itself and adds its input gradient into the base's in
place; and with `fused_kernels` the norm's and SwiGLU's elementwise math runs as compiled kernels (`Kernels`,
`compiled_kernels()`), one pass over memory each.

`apply(model, enabled, fused_kernels)` switches a built model (after peft wrapped it) either way and can be called
again (the bench reuses one base for several variants). Only modules whose code is known are changed: the norm and MLP
classes of Llama, Mistral and Qwen2/3 (`NORM_CLASSES`, `MLP_CLASSES`, matched by class; each is tested against the
math here), and LoRA layers running plain LoRA (not DoRA, not merged, one active adapter); everything else keeps its
own forward. `not_lean` names what a lean model should have made lean but did not (an unknown family, a renamed
class): a job reports it as a warning event.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import weakref
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# --- the elementwise math: eager, or compiled into fused kernels (`fused_kernels`) --------------------------

def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Llama RMSNorm (fp32 math, ``weight * normed.to(input dtype)``) and the fp32 per-token scale."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _rms_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The input's gradient: d/dx of x * rsqrt(mean(x^2) + eps), the direct term and the one through the scale."""
    x32 = x.to(torch.float32)
    grad_normed = (grad * weight).to(torch.float32)
    dot = (grad_normed * x32).sum(-1, keepdim=True)
    return (grad_normed * rstd - x32 * (dot * rstd.pow(3) / x.shape[-1])).to(x.dtype)


def _normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The norm's output again, by the forward's own operations (bitwise the same)."""
    return weight * (x.to(torch.float32) * rstd).to(x.dtype)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of gate and up, silu redone with the kernels autograd runs (bitwise autograd's, eager)."""
    return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The elementwise math of the lean norm and SwiGLU, forward, backward and rebuild."""

    rms_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rms_backward: Callable[..., torch.Tensor]
    normed: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    swiglu_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]


EAGER = Kernels(_rms_forward, _rms_backward, _normed, _swiglu, _swiglu_backward)


class _Compiled:
    """`fn` compiled by torch.compile (dynamic shapes: one compilation serves every token count): each of the
    eager version's several passes over memory becomes one fused kernel (Triton on CUDA, C++ on the CPU). If
    compiling fails (no Triton, no C++ compiler, an unsupported torch), the eager version runs from then on."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.eager, self.compiled, self.failed = fn, torch.compile(fn, dynamic=True, fullgraph=True), False

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager math is always right
                self.failed = True
                log.warning("fused_kernels: compiling %s failed, running it eagerly: %s", self.eager.__name__,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return self.eager(*args)


@cache
def compiled_kernels() -> Kernels:
    """The compiled kernels, one set per process (compiled on first use)."""
    return Kernels(*(_Compiled(getattr(EAGER, f.name)) for f in dataclasses.fields(Kernels)))


def fused_fallbacks() -> list[str]:
    """The compiled kernels that failed to compile in this process and run the eager math instead."""
    kernels = compiled_kernels()
    return [f.name for f in dataclasses.fields(Kernels) if getattr(kernels, f.name).failed]


# --- the functions ------------------------------------------------------------------------------------------

def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype peft's LoRA matmuls run in: autocast's under autocast, else the adapter weights'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _branch_forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``result + lora_B(lora_A(dropout(x))) * scaling`` and the rank-r ``dropout(x) A^T``; notes on ctx what the
    backward needs besides x, a, b and that rank-r tensor (which the caller saves). The scaling goes into the
    small B (out x r) and the sum into the matmul (``addmm``): no pass over the full-width LoRA output to scale
    it, none to add it to the base layer's output, and none in backward to scale the incoming gradient."""
    dtype = _compute_dtype(x, a)
    xc = x.to(dtype)
    state = _rng_state(x.device) if p > 0 else None
    dropped = torch.native_dropout(xc, p, True)[0] if p > 0 else xc
    with torch.autocast(x.device.type, enabled=False):
        u = F.linear(dropped, a.to(dtype))
        b_scaled = b.to(dtype) * scaling
        if result.dtype == dtype:
            out = torch.addmm(result.reshape(-1, result.shape[-1]), u.reshape(-1, u.shape[-1]), b_scaled.t())
            out = out.view(result.shape)
        else:
            out = result + F.linear(u, b_scaled).to(result.dtype)
    ctx.state, ctx.p, ctx.scaling, ctx.dtype = state, p, scaling, dtype
    return out, u


def _branch_backward(ctx: Any, grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, u: torch.Tensor,
                     need_x: bool, into: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x (in the compute dtype; added in place to `into`, the base layer's input gradient, when
    given), a and b. The forward's dropout mask is replayed: the same generator state, the same kernel, the same
    input."""
    dtype, p = ctx.dtype, ctx.p
    xc = x.to(dtype)
    if p > 0:
        current = _rng_state(x.device)
        _set_rng_state(ctx.state, x.device)
        dropped, mask = torch.native_dropout(xc, p, True)
        _set_rng_state(current, x.device)
    else:
        dropped, mask = xc, None
    with torch.autocast(x.device.type, enabled=False):
        g = grad.to(dtype)
        g2, u2, d2 = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]), dropped.reshape(-1, dropped.shape[-1])
        grad_b = ((g2.t() @ u2) * ctx.scaling).to(b.dtype) if b.requires_grad else None
        grad_u = g @ (b.to(dtype) * ctx.scaling)
        grad_a = (grad_u.reshape(-1, grad_u.shape[-1]).t() @ d2).to(a.dtype) if a.requires_grad else None
        grad_x = None
        if need_x:
            grad_x = grad_u @ a.to(dtype)
            if into is not None:  # one pass: into += grad_x * mask / (1 - p)
                grad_x = into.addcmul_(grad_x, mask, value=1.0 / (1.0 - p)) if mask is not None else into.add_(grad_x)
            elif mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))
    return grad_x, grad_a, grad_b


class _RebuiltOutput:
    """How to rebuild the output of a lean norm or SwiGLU from what that function keeps anyway (the norm: its input,
    weight and scale; SwiGLU: gate and up), for the LoRA branches it feeds (q/k/v, gate/up, down). In backward the
    first branch to need the output rebuilds it, the others reuse it, the last one drops it."""

    __slots__ = ("output", "inputs", "constants", "rebuild", "users", "tensor")

    def __init__(self, output: torch.Tensor, inputs: tuple[torch.Tensor, ...], constants: tuple[torch.Tensor, ...],
                 rebuild: Any) -> None:
        # weak: the registry must not keep activations alive; constants (a weight, the per-token scale) are small
        self.output, self.inputs = weakref.ref(output), tuple(weakref.ref(t) for t in inputs)
        self.constants, self.rebuild = constants, rebuild
        self.users, self.tensor = 0, None

    def kept(self) -> tuple[torch.Tensor, ...] | None:
        inputs = tuple(ref() for ref in self.inputs)
        return None if any(t is None for t in inputs) else inputs + self.constants

    def take(self, *kept: torch.Tensor) -> torch.Tensor:
        """The output, rebuilt from `kept` (what the branch saved: `kept()` of the forward) or reused."""
        output = self.tensor if self.tensor is not None else self.rebuild(*kept)
        self.users -= 1
        self.tensor = output if self.users > 0 else None
        return output


# Outputs of lean norms and SwiGLUs still alive, by id. A LoRA branch fed by one keeps what rebuilds it instead.
_SOURCES: dict[int, _RebuiltOutput] = {}


def _remember(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], constants: tuple[torch.Tensor, ...], rebuild: Any) -> None:
    if len(_SOURCES) >= 256:
        for key in [k for k, source in _SOURCES.items() if source.output() is None]:
            del _SOURCES[key]
    _SOURCES[id(output)] = _RebuiltOutput(output, inputs, constants, rebuild)


def _source_of(t: torch.Tensor) -> tuple[_RebuiltOutput, tuple[torch.Tensor, ...]] | None:
    """The source that made `t` and what rebuilds `t`, or None."""
    source = _SOURCES.get(id(t))
    if source is None or source.output() is not t:
        return None
    kept = source.kept()
    return None if kept is None else (source, kept)


class LoraBranch(torch.autograd.Function):
    """``result + lora_B(lora_A(dropout(x))) * scaling`` (result: the base layer's output), keeping x A^T, the
    generator state and x itself -- or, when x is the output of a lean norm (q/k/v, gate/up) or SwiGLU (down),
    what that function keeps anyway (the norm's input and scale; gate and up); x is rebuilt from them in
    backward, once for all the branches it feeds. The dropout output and mask are never kept.

    With `base` (a frozen 4-bit layer, `_owns_base`) instead of `result`, the base layer runs inside: its forward
    here, and in backward its input gradient (bitsandbytes' own: the incoming gradient times the dequantized
    weight), into which the branch adds its own in place -- one tensor and one autograd sum fewer per module."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor | None, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float,
                scaling: float, base: Any = None) -> torch.Tensor:
        if base is not None:
            result = base(x)  # no graph is recorded inside forward: backward below does the base's part
        out, u = _branch_forward(ctx, result, x, a, b, p, scaling)
        found = _source_of(x)
        ctx.source, kept = found if found is not None else (None, (x,))
        if ctx.source is not None:
            ctx.source.users += 1
        ctx.base = base
        ctx.save_for_backward(*kept, a, b, u)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        *kept, a, b, u = ctx.saved_tensors
        x = ctx.source.take(*kept) if ctx.source is not None else kept[0]
        need_x, base_grad = ctx.needs_input_grad[1], None
        if ctx.base is not None and need_x:
            from bitsandbytes.functional import dequantize_4bit

            weight = ctx.base.weight  # as bitsandbytes' MatMul4Bit.backward computes it
            base_grad = torch.matmul(grad, dequantize_4bit(weight.data, weight.quant_state).to(grad.dtype))
        grad_x, grad_a, grad_b = _branch_backward(ctx, grad, x, a, b, u, need_x, into=base_grad)
        grad_result = grad if ctx.base is None else None
        return grad_result, (grad_x.to(x.dtype) if grad_x is not None else None), grad_a, grad_b, None, None, None


class RMSNormFunction(torch.autograd.Function):
    """transformers' Llama RMSNorm (fp32 math, ``weight * normed.to(input dtype)``), keeping the input in its own
    dtype and the fp32 per-token scale instead of an fp32 copy of the input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: Kernels = EAGER) -> torch.Tensor:
        out, rstd = kernels.rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.kernels = kernels
        _remember(out, (x,), (weight, rstd), kernels.normed)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_w = None
        if weight.requires_grad:  # a frozen norm (the LoRA case) does not rebuild its normalized input
            normed = (x.to(torch.float32) * rstd).to(x.dtype)
            grad_w = (grad * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_x = ctx.kernels.rms_backward(grad, x, weight, rstd) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None, None


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up; silu is redone in backward (the same kernels autograd uses)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, kernels: Kernels = EAGER) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.kernels = kernels
        out = kernels.swiglu(gate, up)
        _remember(out, (gate, up), (), kernels.swiglu)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ctx.kernels.swiglu_backward(grad, gate, up)
        return (grad_gate if ctx.needs_input_grad[0] else None), (grad_up if ctx.needs_input_grad[1] else None), None


# --- the forwards that use them ----------------------------------------------------------------------------

def rmsnorm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, self.__dict__.get("lean_kernels", EAGER))


def mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # down_proj's LoRA branch (lora_forward) finds that its input came from SwiGLUFunction and keeps gate and up
    kernels = self.__dict__.get("lean_kernels", EAGER)
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x), kernels))


def _plain_lora_adapter(module: Any) -> str | None:
    """The adapter name if `module` is a lean LoRA layer running plain LoRA now (one active adapter, no DoRA,
    not merged, no LoRA bias), else None."""
    if getattr(module, "forward", None) is None or getattr(module.forward, "__func__", None) is not lora_forward:
        return None
    adapters = module.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (module.disable_adapters or module.merged or name is None or name not in module.lora_A
            or name in module.lora_variant or module.lora_B[name].bias is not None):
        return None
    return name


def _lora_parts(module: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    dropout = module.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return module.lora_A[name].weight, module.lora_B[name].weight, p, float(module.scaling[name])


def _owns_base(base: Any) -> bool:
    """A frozen bitsandbytes 4-bit layer without bias, whose input gradient `LoraBranch` computes itself."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    return (isinstance(base, Linear4bit) and base.bias is None and state is not None and not weight.requires_grad
            and not getattr(state, "packing_format_for_cpu", False))  # repacked for CPU inference: bnb's own path


def lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA forward for the plain case, with `LoraBranch`; any other case goes to peft's own forward."""
    name = None if args or kwargs else _plain_lora_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    if _owns_base(self.base_layer):
        return LoraBranch.apply(None, x, *_lora_parts(self, name), self.base_layer)
    return LoraBranch.apply(self.base_layer(x), x, *_lora_parts(self, name))


# --- switching a model -------------------------------------------------------------------------------------

# The transformers classes whose forward is Llama's RMSNorm (fp32 math, weight * normed) or SwiGLU MLP
# (down(act(gate(x)) * up(x))), by model family. Matched by exact class: a subclass may change forward. Each is checked
# against the lean math in tests/training/test_lean_activations.py, so a transformers release that changes or drops one fails there.
NORM_CLASSES = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "qwen2": "Qwen2RMSNorm", "qwen3": "Qwen3RMSNorm"}
MLP_CLASSES = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP"}


def _transformers_class(family: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


@cache
def known_classes() -> dict[type, str]:
    """The norm and MLP classes lean activations replace the forward of: class -> "norms" or "mlps"."""
    known = {_transformers_class(family, name): "norms" for family, name in NORM_CLASSES.items()}
    return known | {_transformers_class(family, name): "mlps" for family, name in MLP_CLASSES.items()}


def _silu(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def apply(model: torch.nn.Module, enabled: bool, fused_kernels: bool = False) -> dict[str, int]:
    """Give every known norm, MLP and LoRA layer of `model` the lean forward (enabled) or its own (not); the norms
    and MLPs run the compiled kernels (`compiled_kernels()`) when `fused_kernels`, else the eager math. Returns how many
    modules of each kind are lean now (`not_lean` names the ones a lean model was expected to have but has not)."""
    from peft.tuners.lora import LoraLayer

    known = known_classes()
    counts = {"norms": 0, "mlps": 0, "lora": 0}
    for module in model.modules():
        kind = known.get(type(module))
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module):
            kind, forward = "lora", lora_forward
        elif kind == "norms":
            forward = rmsnorm_forward
        elif kind == "mlps" and _silu(module):
            forward = mlp_forward
        else:
            continue
        module.__dict__.pop("forward", None)  # back to the class's forward
        module.__dict__.pop("lean_kernels", None)
        if enabled:
            module.forward = types.MethodType(forward, module)
            if fused_kernels and kind != "lora":
                module.__dict__["lean_kernels"] = compiled_kernels()
            counts[kind] += 1
    return counts


def not_lean(model: torch.nn.Module) -> list[str]:
    """The modules that the memory plan of lean activations counts as lean (contract/memory.py: every RMSNorm and
    each decoder layer's MLP) but that run their own forward: "name (class)" each. Empty after `apply(model, True)` on
    a model of a known family; anything else means the speed-up and the planned memory are not what the job gets."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    mlps = {id(layer.mlp) for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer) and hasattr(layer, "mlp")}
    lean_forwards = (rmsnorm_forward, mlp_forward)
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
            if (type(m).__name__.endswith("RMSNorm") or id(m) in mlps)
            and getattr(m.__dict__.get("forward"), "__func__", None) not in lean_forwards]

"""The adapter layers: `LoraLinear` around a frozen `base_layer`, and `ModulesToSave`.

Design choices:
- PEFT's shape: a wrapper keeps the original `nn.Linear` as `base_layer` (frozen,
  possibly NF4 or bf16) and holds any number of named adapters beside it, so several
  adapters share one base in memory and switching is setting `active`.
- A and B are bare `nn.Parameter`s in `ParameterDict`s (`lora_A.<name>` [r, in],
  `lora_B.<name>` [out, r]); DoRA adds `lora_magnitude.<name>` [out]. The update is
  computed as two skinny matmuls `s · B(A(x))`, never as a dense [out, in] matrix.
- Layers that share an input (q/k/v, gate/up) run as one `_FusedLoraLinear` when all
  take the fused path (`LoraLinear.forward_group`, called by the decoder's `project`):
  x is read once for all A products and backward makes one input gradient, where
  separate layers made one each for autograd to sum. On the LoRA benchmark's step, about
  25 ms of 0.7 s. In compiled blocks such a group computes each output as one matmul
  over [x | x·Aᵀ] and [W | s·B] instead of adding the update in place, which inductor
  would do by copying the output first (compiled LoRA step 0.43 -> 0.40 s).
- Rows of one batch can use different adapters (`routing`, set by `multi.row_adapters`):
  the base runs once on the whole batch, then each adapter runs only on its rows,
  which are gathered by index and scattered back with `index_add`.
- Measured and dropped for the fused LoRA linear (`_FusedLoraLinear`): the forward on
  a merged weight W + s·BA (no faster, and it rounds W + s·BA to bf16); the adapter's
  product first with the base matmul accumulated into it (faster alone, no faster in
  the step); the same as torch.library custom ops, which spare compiled graphs the
  copy a functionalized addmm_ makes (about 30 ms a step) but lose as much elsewhere
  (measured again with only the in-place addmm_ as a mutable op, which inductor
  re-inplaces: the copies go, but the recomputed forward inside backward gets clones
  of its own; 0.45 s either way);
  glibc malloc thresholds against page faults (fewer faults, no faster step); A and B
  cast inside the Function with float32 gradients returned from it, sparing autograd
  four cast and stacking nodes per layer (no faster: paired A/B +6 ms of 0.49 s); the
  reductions over rows (gradients of A and B) as a bmm over row halves, one per thread
  (no faster); in compiled blocks, the update as a plain add for inductor to fuse into
  the next element-wise kernel (+15 ms of 0.43 s: its functionalized addmm_ wins).
- Where the eager LoRA step's extra time goes (over the same step with adapters
  disabled; alternating steps, 2 CPU threads): about 28 ms does not grow with the batch
  (batch 1, 2, 8: +38, +56, +106 ms). Most of it is the ~270 extra bf16 matmul calls, each
  at least ~25 us in oneDNN (float32 MKL: 4 us). A and B's casts and stacking cost ~1 ms
  (paired A/B against cached bf16 copies). Skipping the forward B-add and the g·sB
  products altogether (wrong results, an upper bound) saves 26 ms: keeping q/k/v and
  gate/up as one persistent weight joined with the B columns, so that both ride inside
  the base matmuls, could at best win part of that, at the price of base weights that
  are views into a shared buffer (merge, FSDP, saving). A forward-only prototype (the
  groups' [W | s·B] kept, only s·B copied in each step) measured -7 and -11 ms of
  0.54 s in paired A/B: not done. In compiled groups, the backward's g·sB taken inside
  the input-gradient matmul over the forward's [W | s·B] (one matmul per layer gives
  both): +9 ms with in-place sums, +19 ms with plain ones.
- `weight` is the effective weight (base + active update) so that code that reads
  `model.lm_head.weight` directly (the chunked losses) sees the adapter.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.adapters import dora, qlora
from graftlm.errors import GraftError


class _FusedLoraLinear(torch.autograd.Function):
    """y_i = x W_iᵀ + b_i + (x A_iᵀ)(s_i·B_i)ᵀ for one or more frozen linears on the same
    input x (one layer, or q/k/v, or gate/up), with a hand-written backward.

    Autograd would keep a separate product, scale and sum per term. Here the update is
    added inside a matmul (addmm_) in both directions and the scale is folded into the
    small B; x is read once for every layer's A product (one matmul with the A's
    stacked, [Σr, in]); and backward makes one input gradient for all the layers, where
    separate layers made one each for autograd to sum. Only x and x·Aᵀ (Σr columns) are
    saved; the frozen W's get no gradient.
    """

    @staticmethod
    def forward(ctx, x, lora_a, ranks, scales, *layers):
        # layers: (weight, bias, lora_b) per layer; lora_a: the layers' A's stacked.
        flat = x.reshape(-1, x.shape[-1])
        xa = flat @ lora_a.t()  # [N, Σr]
        # In a compiled graph, layers that share x take their updates inside one matmul
        # over [x | x·Aᵀ] and [W | s·B]: inductor's addmm writes a fresh buffer, so adding
        # in place would first copy every output (compiled LoRA step 0.43 -> 0.40 s).
        # Eagerly it is no faster, and for a single layer the joined input costs more
        # than the copy it saves: the update is added in place there.
        joined = torch.cat([flat, xa], dim=1) if torch.compiler.is_compiling() and len(ranks) > 1 else None
        outs, saved, start = [], [], 0
        for (weight, bias, lora_b), rank, scale in zip(_triples(layers), ranks, scales):
            b_scaled = lora_b * scale
            if joined is None:
                out = F.linear(flat, weight, bias)
                out.addmm_(xa[:, start:start + rank], b_scaled.t())
            else:  # s·B in this layer's rank columns of x·Aᵀ, zeros in the others'
                b_columns = F.pad(b_scaled, (start, xa.shape[1] - start - rank))
                out = F.linear(joined, torch.cat([weight, b_columns], dim=1), bias)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            saved += [weight, b_scaled]
            start += rank
        ctx.save_for_backward(flat, xa, lora_a, *saved)
        ctx.ranks, ctx.scales, ctx.x_shape = ranks, scales, x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        flat, xa, lora_a, *saved = ctx.saved_tensors
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        pairs = list(zip(saved[0::2], saved[1::2]))  # (weight, b_scaled) per layer
        gb = torch.cat([g @ b_scaled for g, (_, b_scaled) in zip(grads, pairs)], dim=1)  # [N, Σr]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grads[0] @ pairs[0][0]
            for g, (weight, _) in zip(grads[1:], pairs[1:]):
                grad_x.addmm_(g, weight)
            grad_x = grad_x.addmm_(gb, lora_a).view(*ctx.x_shape)
        grad_a = gb.t() @ flat if ctx.needs_input_grad[1] else None
        grad_layers, start = [], 0
        for i, (g, rank, scale) in enumerate(zip(grads, ctx.ranks, ctx.scales)):
            needs_b = ctx.needs_input_grad[4 + 3 * i + 2]
            grad_layers += [None, None, (g.t() @ xa[:, start:start + rank]) * scale if needs_b else None]
            start += rank
        return grad_x, grad_a, None, None, *grad_layers


def _triples(flat: tuple) -> list[tuple]:
    return [flat[i:i + 3] for i in range(0, len(flat), 3)]


def fused_lora_linear(x: torch.Tensor, layers: list[LoraLinear]) -> tuple[torch.Tensor, ...]:
    """Each layer's output (base + active adapter) for the same x, as one
    `_FusedLoraLinear`, in the compute dtype (autocast's, else x's)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    names = [layer.active for layer in layers]
    lora_a = torch.cat([layer.lora_A[name].to(dtype) for layer, name in zip(layers, names)])
    flat = []
    for layer, name in zip(layers, names):
        bias = layer.base_layer.bias
        flat += [layer.base_layer.weight.to(dtype), bias.to(dtype) if bias is not None else None,
                 layer.lora_B[name].to(dtype)]
    ranks = tuple(layer.lora_A[name].shape[0] for layer, name in zip(layers, names))
    scales = tuple(layer.scaling[name] for layer, name in zip(layers, names))
    with torch.autocast(x.device.type, enabled=False):
        return _FusedLoraLinear.apply(x.to(dtype), lora_a, ranks, scales, *flat)


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.disabled = False
        self.merged: str | None = None  # the adapter folded into base_layer.weight, if any
        self.routing = None  # a multi.RowRouting while rows use different adapters
        self._dora_norms: dict[str, torch.Tensor] = {}  # what unmerging DoRA needs

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    # -- adapters -------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, use_dora: bool,
                    init: str = "default") -> None:
        device = self.base_layer.weight.device
        a = torch.empty(r, self.in_features, device=device)
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:  # PEFT's default: A as nn.Linear initialises its weight, B zeros
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.scaling[name] = scaling
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if use_dora:
            norms = dora.row_norms(self.base_weight(), a, self.lora_B[name].detach(), scaling)
            self.lora_magnitude[name] = nn.Parameter(norms.float())

    def remove_adapter(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        if self.active == name:
            self.active = None

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen base weight as a plain tensor (NF4 dequantized)."""
        return qlora.dequantize(self.base_layer.weight, dtype)

    # -- forward --------------------------------------------------------------------

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        if qlora.is_nf4(weight):
            return qlora.nf4_linear(x, self.base_layer)
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # A bf16-stored base under a float32 caller: compute in the base's dtype.
            return F.linear(x.to(weight.dtype), weight, self.base_layer.bias).to(x.dtype)
        return self.base_layer(x)

    def _delta(self, x: torch.Tensor, base_out: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` adds to the base output for input x."""
        a, b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dropout = self.lora_dropout[name]
        dtype = base_out.dtype
        h = dropout(x).to(dtype)
        if name not in self.lora_magnitude:
            return F.linear(F.linear(h, a.to(dtype)), b.to(dtype)) * scale
        if isinstance(dropout, nn.Identity) or not self.training:
            base_no_bias = base_out if self.base_layer.bias is None else base_out - self.base_layer.bias.to(dtype)
        else:  # the base output must be of the same (dropped-out) input, as in PEFT
            base_no_bias = F.linear(h, self.base_weight(dtype))
        return dora.dora_delta(h, base_no_bias, self.base_weight(dtype), a, b, self.lora_magnitude[name], scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            if self.disabled or self.routing is not None or self.active != self.merged:
                raise GraftError("adapters: a merged adapter cannot be disabled, switched or routed per row; "
                                 "call graftlm.adapters.unmerge(model) first")
            return self._base(x)
        if self.routing is not None:
            return self._forward_rows(x, self._base(x))
        if self.disabled or self.active is None or self.active not in self.lora_A:
            return self._base(x)
        name = self.active
        if self._fusable(name):
            return fused_lora_linear(x, [self])[0]
        base_out = self._base(x)
        return base_out + self._delta(x, base_out, name)

    @staticmethod
    def forward_group(x: torch.Tensor, layers: list[LoraLinear]) -> tuple[torch.Tensor, ...] | None:
        """Layers that share the input x, run as one `_FusedLoraLinear`; None when they
        cannot be: not all on the fused path with an active adapter."""
        if not all(isinstance(layer, LoraLinear) and layer._runs_fused() for layer in layers):
            return None
        return fused_lora_linear(x, layers)

    def _runs_fused(self) -> bool:
        """Whether `forward` takes the fused path (one active, unmerged, unrouted adapter)."""
        return (self.merged is None and self.routing is None and not self.disabled
                and self.active is not None and self.active in self.lora_A and self._fusable(self.active))

    def _fusable(self, name: str) -> bool:
        """Plain LoRA on an unquantized base without active dropout takes the fused path."""
        return (name not in self.lora_magnitude and not qlora.is_nf4(self.base_layer.weight)
                and (isinstance(self.lora_dropout[name], nn.Identity) or not self.training))

    def _forward_rows(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        out = base_out
        for name, rows in self.routing.groups(x.shape[0], x.device):
            if name not in self.lora_A:
                continue  # this adapter does not target this layer
            if rows is None:  # every row uses this adapter
                out = out + self._delta(x, base_out, name)
            else:
                delta = self._delta(x.index_select(0, rows), base_out.index_select(0, rows), name)
                out = out.index_add(0, rows, delta)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight: base plus the active adapter's update (differentiable)."""
        name = None if self.disabled or self.merged is not None else self.active
        if name is None or name not in self.lora_A:
            return self.base_layer.weight
        return self._adapted_weight(name, self.base_weight())

    def _adapted_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        a, b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        if name in self.lora_magnitude:
            return dora.merged_weight(weight, a, b, self.lora_magnitude[name], scale)[0]
        return weight + scale * (b.to(weight.dtype) @ a.to(weight.dtype))

    # -- merge ----------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, safe: bool = True, name: str | None = None) -> None:
        """Fold adapter `name` (default: the active one) into the base weight.

        A quantized base is dequantized first (merging stays in full precision).
        """
        name = name or self.active
        if self.merged is not None or name is None or name not in self.lora_A:
            return
        dtype = self.base_layer.weight.dtype if not qlora.is_nf4(self.base_layer.weight) else torch.float32
        weight = self.base_weight()
        if name in self.lora_magnitude:
            merged, norms = dora.merged_weight(weight, self.lora_A[name], self.lora_B[name],
                                               self.lora_magnitude[name], self.scaling[name])
            self._dora_norms[name] = norms
        else:
            merged = self._adapted_weight(name, weight)
        if safe and not torch.isfinite(merged).all():
            raise GraftError(f"adapters: merging adapter '{name}' gives non-finite weights in a "
                             f"{self.out_features}x{self.in_features} layer; not merged")
        self.base_layer.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        name = self.merged
        if name is None:
            return
        weight = self.base_weight()
        a, b, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        if name in self.lora_magnitude:
            weight = dora.unmerged_weight(weight, a, b, self.lora_magnitude[name], self._dora_norms.pop(name), scale)
        else:
            weight = weight - scale * (b.float() @ a.float())
        self.base_layer.weight.copy_(weight.to(self.base_layer.weight.dtype))
        self.merged = None


class ModulesToSave(nn.Module):
    """A module trained in full: one trainable copy per adapter beside the frozen original.

    PEFT's `ModulesToSaveWrapper`, e.g. for `lm_head` or `embed_tokens` when new tokens
    are added. Rows routed to different adapters each run their adapter's copy.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.routing = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        trained = copy.deepcopy(self.original_module).float()
        trained.requires_grad_(True)
        self.modules_to_save[name] = trained

    def remove_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def chosen(self, name: str | None) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    def current(self) -> nn.Module:
        return self.chosen(None if self.disabled else self.active)

    @property
    def weight(self) -> torch.Tensor:
        return self.current().weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is None:
            return self.current()(x)
        groups = [(name, rows) for name, rows in self.routing.groups(x.shape[0], x.device, with_base=True)]
        if len(groups) == 1:
            return self.chosen(groups[0][0])(x)
        outs = [self.chosen(name)(x.index_select(0, rows)) for name, rows in groups]
        order = torch.cat([rows for _, rows in groups])
        dtype = functools.reduce(torch.promote_types, (o.dtype for o in outs))
        return torch.cat([o.to(dtype) for o in outs]).index_select(0, torch.argsort(order))

"""Fused projections: one matmul for q, k and v, one for gate and up, instead of three and two.

transformers' Llama-style layers call `q_proj`, `k_proj` and `v_proj` (and the MLP's `gate_proj`
and `up_proj`) one after another on the same hidden states. `fuse_projections` concatenates
their weights into one matrix per group (a `FusedProjection` registered on the layer) and
replaces each projection with a view that reads its slice of the one product. The values are
bitwise those of the separate matmuls (checked in tests/test_engine.py; MKL reduces each output
over the same inputs in the same order), so outputs do not change; whether it is faster is a
property of the machine's matmul kernels, measured by benchmarks/bench_best_of_n.py.
"""

from __future__ import annotations

import torch

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class FusedProjection(torch.nn.Module):
    """The concatenated weight of several projections of one input, and the product they share."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.cat([linear.weight.detach() for linear in linears]), requires_grad=False)
        biases = [linear.bias for linear in linears]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.nn.Parameter(torch.cat([
                b.detach() if b is not None else linear.weight.new_zeros(linear.out_features)
                for b, linear in zip(biases, linears, strict=True)]), requires_grad=False)
        sizes = [linear.out_features for linear in linears]
        self.bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def part(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Projection `index` of `hidden`: the first call on a new input runs the one matmul."""
        if hidden is not self._input:
            self._input, self._output = hidden, torch.nn.functional.linear(hidden, self.weight, self.bias)
        out = self._output[..., self.bounds[index] : self.bounds[index + 1]]
        if index == len(self.bounds) - 2:  # the last projection: let go of the input and the product
            self._input = self._output = None
        return out


class ProjectionSlice(torch.nn.Module):
    """Stands in for one of the fused projections (same call, same output)."""

    def __init__(self, fused: FusedProjection, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the layer owns it once
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fused.part(hidden, self.index)


def fuse_projections(model) -> int:
    """Fuse each decoder layer's q/k/v and gate/up projections in place; returns how many groups were fused.

    Layers whose projections are not plain `torch.nn.Linear` modules (quantized, adapters) are left alone.
    """
    fused = 0
    for layer in model.model.layers:
        for block_name, names in GROUPS.items():
            block = getattr(layer, block_name, None)
            linears = [getattr(block, name, None) for name in names]
            if block is None or not all(type(linear) is torch.nn.Linear for linear in linears):
                continue
            group = FusedProjection(linears)
            block.add_module("fused_" + "_".join(n.removesuffix("_proj") for n in names), group)
            for index, (name, linear) in enumerate(zip(names, linears, strict=True)):
                setattr(block, name, ProjectionSlice(group, index, linear.in_features, linear.out_features))
            fused += 1
    return fused

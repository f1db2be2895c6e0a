"""What torch.compile hands its backend, for tests that check a module's traced form."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd


def traced_ops(module: nn.Module, x: torch.Tensor) -> tuple[set, torch.Tensor]:
    """The aten ops torch.compile hands its backend for ``module(x)`` (the graph inductor would
    get, recorded rather than compiled: no C++ compiler needed), and the result."""
    seen: set = set()

    def record(gm, example_inputs):
        def backend(graph, inputs):
            seen.update(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
            return graph

        return aot_autograd(fw_compiler=backend)(gm, example_inputs)

    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(module, backend=record, dynamic=False)(x)
    return seen, out

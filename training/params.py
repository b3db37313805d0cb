"""Parameter arithmetic: what each layer costs, next to what a dense layer would cost instead.

A convolution shares one small kernel across every position, so its weight count does not
depend on the image size; a dense layer from the flattened input to the same number of units
needs ``inputs x units`` weights. For a 224x224x3 image to 1,000 units that is
``150,528 x 1,000 = 150,528,000`` weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from training.model import ConvNet

PARAMETER_SECTION = "## Parameter arithmetic"


@dataclass(frozen=True)
class LayerCost:
    """One layer with parameters, its shapes (without the batch axis) and its cost."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    parameters: int

    @property
    def dense_weights(self) -> int:
        """Weights of one dense layer from the flattened input to the flattened output."""
        return math.prod(self.input_shape) * math.prod(self.output_shape)


def dense_weights(input_shape: tuple[int, ...], units: int) -> int:
    return math.prod(input_shape) * units


def layer_costs(network: ConvNet) -> list[LayerCost]:
    """Runs one dummy image through ``network`` to record each parameterised layer's shapes."""
    config = network.config
    costs: list[LayerCost] = []
    handles = []
    for name, module in network.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):

            def hook(
                module: nn.Module,
                args: tuple[torch.Tensor, ...],
                output: torch.Tensor,
                name: str = name,
            ) -> None:
                costs.append(
                    LayerCost(
                        name,
                        type(module).__name__,
                        tuple(args[0].shape[1:]),
                        tuple(output.shape[1:]),
                        sum(p.numel() for p in module.parameters()),
                    )
                )

            handles.append(module.register_forward_hook(hook))
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            device = next(network.parameters()).device
            network(
                torch.zeros(
                    1, config.in_channels, config.image_size, config.image_size, device=device
                )
            )
    finally:
        network.train(was_training)
        for handle in handles:
            handle.remove()
    return costs


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def parameter_markdown(network: ConvNet) -> list[str]:
    """The ``## Parameter arithmetic`` section of the report, as markdown lines."""
    config = network.config
    costs = layer_costs(network)
    total = sum(p.numel() for p in network.parameters())
    input_shape = (config.in_channels, config.image_size, config.image_size)
    inputs = math.prod(input_shape)
    lines = [PARAMETER_SECTION, ""]
    lines += [
        "| layer | kind | input | output | parameters | one dense layer, same input to same "
        "width |",
        "|---|---|---|---|---:|---:|",
    ]
    for cost in costs:
        dense = f"{cost.dense_weights:,}" if cost.kind != "BatchNorm2d" else ""
        lines.append(
            f"| {cost.name} | {cost.kind} | {_shape(cost.input_shape)} | "
            f"{_shape(cost.output_shape)} | {cost.parameters:,} | {dense} |"
        )
    lines.append(f"| **total** | | | | **{total:,}** | |")
    first = costs[0]
    lines += [
        "",
        f"The flattened input has {_shape(input_shape)} = {inputs:,} values. One dense layer "
        f"from it to the width of the first convolution's output ({_shape(first.output_shape)} = "
        f"{math.prod(first.output_shape):,} units) would need {first.dense_weights:,} weights; "
        f"the convolution has {first.parameters:,} parameters, whatever the image size.",
        "",
        f"The whole network has {total:,} parameters. A 224x224x3 image flattened is "
        f"{dense_weights((3, 224, 224), 1):,} values, and one dense layer from it to 1,000 units "
        f"needs {dense_weights((3, 224, 224), 1000):,} weights.",
        "",
    ]
    return lines

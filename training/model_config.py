"""The CNN's configuration and the named presets; no torch here, so readers of the metadata and
the CLI's ``--help`` can use it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from training.errors import ConfigError

ACTIVATIONS = ("relu", "gelu", "silu", "elu")
POOLINGS = ("max", "avg")
HEADS = ("flatten", "global-avg")


@dataclass(frozen=True)
class ModelConfig:
    """What :class:`ConvNet` is made of; stored in checkpoints and in the ONNX metadata."""

    in_channels: int = 1
    """Input channels: 1 for grayscale (Pillow mode L), 3 for RGB."""
    image_size: int = 28
    """Input height and width in pixels (square)."""
    num_classes: int = 10
    """Output units (logits)."""
    blocks: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,))
    """Output channels of each convolution, grouped by block (32,32/64,64: '/' between blocks,
    ',' between convolutions); every block ends with a pooling."""
    kernel_size: int = 3
    """Convolution kernel size (odd: 3 or 5); padding keeps the resolution inside a block."""
    activation: str = "relu"
    """Nonlinearity after each convolution and hidden dense layer: relu, gelu, silu or elu."""
    batch_norm: bool = True
    """Batch normalisation after each convolution (the convolution then has no bias)."""
    pooling: str = "max"
    """Pooling at the end of each block, halving height and width: max or avg."""
    head: str = "flatten"
    """How the last feature map becomes a vector: flatten, or global-avg (one value per channel)."""
    hidden_units: tuple[int, ...] = field(default=(128,), metadata={"aliases": ("--hidden",)})
    """Widths of the hidden dense layers between the features and the output layer (256,128;
    '' for none)."""
    dropout: float = 0.3
    """Dropout probability after each hidden dense layer."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        values = dict(values)
        if "blocks" in values:
            values["blocks"] = tuple(tuple(int(c) for c in block) for block in values["blocks"])
        if "hidden_units" in values:
            values["hidden_units"] = tuple(int(u) for u in values["hidden_units"])
        return cls(**values)

    def feature_size(self) -> int:
        """Height (= width) of the feature map after the last block."""
        size = self.image_size
        for _ in self.blocks:
            size //= 2
        return size

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation '{self.activation}'; choose one of: {', '.join(ACTIVATIONS)}"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"unknown pooling '{self.pooling}'; choose one of: {', '.join(POOLINGS)}"
            )
        if self.head not in HEADS:
            raise ConfigError(f"unknown head '{self.head}'; choose one of: {', '.join(HEADS)}")
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"kernel size must be odd (3 or 5), got {self.kernel_size}")
        if not self.blocks or any(not block for block in self.blocks):
            raise ConfigError("the network needs at least one block of at least one convolution")
        if self.feature_size() < 1:
            raise ConfigError(
                f"input {self.image_size}x{self.image_size} is too small for {len(self.blocks)} "
                f"pooling blocks; use a larger --image-size or fewer blocks"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class Preset:
    """A named architecture; the data set fills in channels, size and classes."""

    config: ModelConfig
    description: str
    epochs: int = 12
    """Epochs a run trains for unless --epochs says otherwise."""
    batch_size: int = 32
    """Images per optimiser step unless --batch-size says otherwise."""
    lr: float = 3e-3
    """Peak learning rate unless --lr says otherwise."""


PRESETS: dict[str, Preset] = {
    "small": Preset(
        ModelConfig(),
        "28x28 grayscale (default): 3 blocks of one 3x3 conv (32, 64, 128), BN, max pool, "
        "dense 128",
        # Chosen by 3-fold cross-validation on the train + validation images of mnist5k (never
        # the test split) among epochs, batch, lr, width and augmentation (docs/training.md).
        epochs=30,
        batch_size=64,
        lr=5e-3,
    ),
    "deep": Preset(
        ModelConfig(
            in_channels=3,
            image_size=32,
            blocks=((32, 32), (64, 64), (128, 128)),
            hidden_units=(256,),
            dropout=0.4,
        ),
        "32x32 RGB (cifar10): 3 blocks of two 3x3 convs (32, 64, 128), BN, max pool, dense 256",
        epochs=30,
    ),
}


def preset_help() -> str:
    return "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())


def resolve_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset's config with the given fields replaced (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    config = replace(
        PRESETS[preset].config, **{k: v for k, v in overrides.items() if v is not None}
    )
    config.validate()
    return config

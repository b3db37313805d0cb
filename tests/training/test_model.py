"""The CNN: output shapes and parameter counts per preset, checked against hand arithmetic."""

from __future__ import annotations

import pytest
import torch

from training.errors import ConfigError
from training.model import ConvNet, ImageClassifier, build_classifier, count_parameters
from training.model_config import PRESETS, ModelConfig, resolve_config
from training.params import layer_costs


def conv(inputs: int, outputs: int, kernel: int = 3) -> int:
    """A convolution followed by batch norm: no conv bias, BN has a scale and a shift."""
    return kernel * kernel * inputs * outputs + 2 * outputs


def dense(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


SMALL = (
    conv(1, 32)
    + conv(32, 64)
    + conv(64, 128)  # 28 -> 14 -> 7 -> 3
    + dense(128 * 3 * 3, 128)
    + dense(128, 10)
)
DEEP = (
    conv(3, 32)
    + conv(32, 32)
    + conv(32, 64)
    + conv(64, 64)
    + conv(64, 128)
    + conv(128, 128)
    + dense(128 * 4 * 4, 256)
    + dense(256, 10)  # 32 -> 16 -> 8 -> 4
)


def test_hand_arithmetic_matches_the_literal_counts() -> None:
    assert SMALL == 241_770
    assert DEEP == 814_570


@pytest.mark.parametrize(
    ("preset", "shape", "parameters"),
    [("small", (1, 28, 28), SMALL), ("deep", (3, 32, 32), DEEP)],
)
def test_preset_shapes_and_parameter_counts(
    preset: str, shape: tuple[int, int, int], parameters: int
) -> None:
    config = PRESETS[preset].config
    assert (config.in_channels, config.image_size, config.image_size) == shape
    network = ConvNet(config)
    assert count_parameters(network) == parameters
    network.eval()
    assert network(torch.zeros(5, *shape)).shape == (5, 10)
    maps = network.feature_maps(torch.zeros(1, *shape))
    assert [m.shape[1:] for m in maps][-1] == (128, shape[1] // 8, shape[2] // 8)


def test_overrides_change_the_network() -> None:
    config = resolve_config(
        "small",
        blocks=((8,), (16,)),
        hidden_units=(),
        kernel_size=5,
        batch_norm=False,
        head="global-avg",
        num_classes=4,
    )
    network = ConvNet(config)
    # conv 5x5 with bias, no BN: 1->8, 8->16; global average -> 16 features -> 4 classes.
    assert count_parameters(network) == (25 * 1 * 8 + 8) + (25 * 8 * 16 + 16) + (16 * 4 + 4)
    assert network(torch.zeros(2, 1, 28, 28)).shape == (2, 4)


def test_parameter_arithmetic_per_layer() -> None:
    costs = layer_costs(ConvNet(PRESETS["small"].config))
    first = costs[0]
    assert (first.kind, first.input_shape, first.output_shape) == (
        "Conv2d",
        (1, 28, 28),
        (32, 28, 28),
    )
    assert first.parameters == 288
    assert first.dense_weights == 784 * 32 * 28 * 28
    assert sum(c.parameters for c in costs) == SMALL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 4}, "input 4x4 is too small for 3 pooling blocks"),
        ({"activation": "tanh"}, "unknown activation 'tanh'; choose one of: relu, gelu, silu, elu"),
        ({"pooling": "min"}, "unknown pooling 'min'; choose one of: max, avg"),
        ({"kernel_size": 4}, "kernel size must be odd"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ],
)
def test_bad_configs_are_refused_with_the_choices(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_config("small", **change)
    assert str(raised.value).startswith(message)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: small, deep"):
        resolve_config("huge")


def test_config_round_trips_through_a_dict() -> None:
    config = PRESETS["deep"].config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_classifier_takes_raw_pixels_and_normalises_inside() -> None:
    torch.manual_seed(0)
    classifier = build_classifier(ModelConfig(blocks=((4,),), hidden_units=()), [0.5], [0.25])
    classifier.eval()
    pixels = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    expected = classifier.network(((pixels.float() / 255) - 0.5) / 0.25)
    torch.testing.assert_close(classifier(pixels), expected)
    torch.testing.assert_close(classifier(pixels.float()), expected)
    assert isinstance(classifier, ImageClassifier)

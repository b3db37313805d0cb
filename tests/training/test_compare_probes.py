"""The comparison's measuring parts, without training: shifts, equivariance, receptive fields,
strongest patches, the dense baseline's size, the verdict and the mistakes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.compare.baseline import DenseConfig, DenseNet, dense_parameters, size_dense_baseline
from training.compare.probes import (
    block_receptive_fields,
    equivariance_error,
    first_layer_maps,
    mistakes,
    receptive_field,
    strongest_patches,
)
from training.compare.shift import (
    DIRECTIONS,
    ShiftAccuracy,
    accuracy_under_shifts,
    background_value,
    shift_images,
    shift_in,
    shift_verdict,
)
from training.errors import ConfigError
from training.model import ConvNet, ImageClassifier, build_classifier, count_parameters
from training.model_config import PRESETS, ModelConfig


def moved_by_hand(image: np.ndarray, rows: int, columns: int, fill: int) -> np.ndarray:
    """``image`` [C, H, W] moved pixel by pixel, the slow obvious way."""
    _, height, width = image.shape
    out = np.full_like(image, fill)
    for r in range(height):
        for c in range(width):
            if 0 <= r - rows < height and 0 <= c - columns < width:
                out[:, r, c] = image[:, r - rows, c - columns]
    return out


def centre_of_ink(images: np.ndarray) -> np.ndarray:
    """(row, column) centre of mass of each image's pixels: [N, 2]."""
    weights = images[:, 0].astype(np.float64)
    rows, columns = np.indices(weights.shape[1:])
    total = weights.sum(axis=(1, 2))
    return np.stack(
        [(weights * rows).sum(axis=(1, 2)) / total, (weights * columns).sum(axis=(1, 2)) / total],
        axis=1,
    )


def digits_clear_of_the_border(images: np.ndarray, margin: int = 4) -> np.ndarray:
    inner = np.zeros(images.shape[-2:], dtype=bool)
    inner[margin:-margin, margin:-margin] = True
    return images[(images[:, 0] * ~inner).sum(axis=(1, 2)) == 0]


@pytest.mark.parametrize("inverted", [False, True])
def test_a_shifted_digit_is_the_original_moved_by_k_with_the_background_filled_in(
    tiny_dataset, inverted: bool
) -> None:
    digit = tiny_dataset.test.images[:1]
    if inverted:  # dark ink on white: the background (and the fill) is 255, not 0
        digit = 255 - digit
    fill = int(background_value(digit)[0])
    assert fill == (255 if inverted else 0)
    for direction, (rows, columns) in DIRECTIONS.items():
        for k in (1, 2, 3, 4):
            shifted = shift_in(digit, direction, k, background_value(digit))
            expected = moved_by_hand(digit[0], rows * k, columns * k, fill)
            np.testing.assert_array_equal(shifted[0], expected, err_msg=f"{direction} {k}")
            # The vacated strip holds the background only.
            strip = {
                "up": shifted[0, :, -k:, :],
                "down": shifted[0, :, :k, :],
                "left": shifted[0, :, :, -k:],
                "right": shifted[0, :, :, :k],
            }[direction]
            assert (strip == fill).all()


def test_a_shift_moves_the_ink_by_exactly_k_pixels(tiny_dataset) -> None:
    digits = digits_clear_of_the_border(tiny_dataset.test.images)
    assert len(digits) >= 10
    before = centre_of_ink(digits)
    for direction, (rows, columns) in DIRECTIONS.items():
        for k in (1, 4):
            moved = shift_in(digits, direction, k, 0)
            # Nothing lost at the edges, and the centre of mass moved by (rows k, columns k).
            assert (
                moved.astype(int).sum(axis=(1, 2, 3)) == digits.astype(int).sum(axis=(1, 2, 3))
            ).all()
            np.testing.assert_allclose(
                centre_of_ink(moved) - before, [[rows * k, columns * k]] * len(digits), atol=1e-9
            )


def test_shift_fill_is_per_channel_and_a_large_shift_leaves_only_background() -> None:
    images = np.zeros((2, 3, 5, 5), dtype=np.uint8)
    images[:, :, 0, :] = [[[10], [20], [30]]]  # border ring: colour (10, 20, 30) on top row ...
    images[:, :, -1, :] = [[[10], [20], [30]]]
    images[:, :, :, 0] = [[[10], [20], [30]]]
    images[:, :, :, -1] = [[[10], [20], [30]]]
    images[:, :, 2, 2] = 255
    fill = background_value(images)
    assert fill.tolist() == [10, 20, 30]
    gone = shift_images(images, 0, 5, fill)
    assert (gone == np.array([10, 20, 30]).reshape(1, 3, 1, 1)).all()


def test_accuracy_under_shifts_is_measured_on_really_moved_images(tiny_dataset) -> None:
    digits = digits_clear_of_the_border(tiny_dataset.test.images)[:12]
    labels = np.arange(len(digits)) % 10
    seen: list[np.ndarray] = []

    def right_only_on_the_originals(batch: np.ndarray) -> np.ndarray:
        # A "model" that recognises each image only as it is: any moved pixel makes it wrong.
        seen.append(batch)
        same = (batch == digits).all(axis=(1, 2, 3))
        logits = np.zeros((len(batch), 10), dtype=np.float32)
        logits[np.arange(len(batch)), np.where(same, labels, (labels + 1) % 10)] = 1
        return logits

    result = accuracy_under_shifts(right_only_on_the_originals, digits, labels, shifts=(0, 1, 3))
    assert result.mean() == [1.0, 0.0, 0.0]
    assert len(seen) == 1 + 2 * len(DIRECTIONS)  # shift 0 is measured once
    moves = [centre_of_ink(batch) - centre_of_ink(digits) for batch in seen[1:]]
    expected = [(rows * k, columns * k) for k in (1, 3) for rows, columns in DIRECTIONS.values()]
    for move, (rows, columns) in zip(moves, expected, strict=True):
        np.testing.assert_allclose(move, [[rows, columns]] * len(digits), atol=1e-9)


def test_a_convolution_is_equivariant_away_from_the_borders_and_a_dense_layer_is_not(
    tiny_dataset, tiny_model_config
) -> None:
    torch.manual_seed(0)
    classifier = build_classifier(tiny_model_config, [0.13], [0.31]).eval()
    # Batch norm with running statistics of its own, so it is not an identity.
    first_norm = classifier.convnet.blocks[0][1]
    first_norm.running_mean.uniform_(-1, 1)
    first_norm.running_var.uniform_(0.5, 2)
    digits = tiny_dataset.test.images[:8]
    conv_maps = first_layer_maps(classifier)
    scale = float(np.abs(conv_maps(digits)).max())
    error = equivariance_error(conv_maps, digits, 2, 3, margin=1, fill=0)
    assert error <= 1e-5 * scale

    dense = nn.Linear(28 * 28, 8 * 28 * 28)

    def dense_maps(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            flat = torch.from_numpy(images).float().flatten(1) / 255
            return dense(flat).reshape(len(images), 8, 28, 28).numpy()

    dense_scale = float(np.abs(dense_maps(digits)).max())
    assert equivariance_error(dense_maps, digits, 2, 3, margin=1, fill=0) > 0.1 * dense_scale


def test_receptive_fields_of_the_presets_by_hand() -> None:
    # small: conv3 -> 3, pool2 -> 4 (jump 2); conv3 -> 4 + 2*2 = 8, pool -> 10 (jump 4);
    # conv3 -> 10 + 2*4 = 18, pool -> 22 (jump 8).
    small = block_receptive_fields(ConvNet(PRESETS["small"].config))
    assert [(f.size, f.jump) for f in small] == [(4, 2), (10, 4), (22, 8)]
    # deep: two 3x3 convs per block: 3, 5, pool 6 (2); 10, 14, pool 16 (4); 24, 32, pool 36 (8).
    deep = block_receptive_fields(ConvNet(PRESETS["deep"].config))
    assert [(f.size, f.jump) for f in deep] == [(6, 2), (16, 4), (36, 8)]


def test_receptive_field_with_stride_and_dilation() -> None:
    layers = [
        nn.Conv2d(1, 1, 3, stride=2, padding=1),  # 3 px, units 2 apart
        nn.ReLU(),
        nn.Conv2d(1, 1, 3, dilation=2, padding=2),  # 3 + (3 - 1) * 2 * 2 = 11
        nn.MaxPool2d(3, stride=1),  # 11 + 2 * 2 = 15
    ]
    field = receptive_field(layers)
    assert (field.size, field.jump) == (15, 2)
    with pytest.raises(ValueError, match="no receptive-field rule for AdaptiveAvgPool2d"):
        receptive_field([nn.AdaptiveAvgPool2d(1)])


def test_receptive_fields_match_the_gradient_of_one_unit() -> None:
    # With positive weights, average pooling and a positive input, one output unit's gradient
    # is non-zero exactly on the input pixels it sees: its receptive field, measured.
    network = ConvNet(
        ModelConfig(blocks=((2,), (2, 2), (2,)), batch_norm=False, pooling="avg", kernel_size=3)
    )
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 0.1)
    for block, field in enumerate(block_receptive_fields(network)):
        image = torch.ones(1, 1, 44, 44, requires_grad=True)  # room for the largest field
        output = network.feature_maps(image)[block]
        middle = output.shape[-1] // 2
        output[0, 0, middle, middle].backward()
        rows = np.flatnonzero(image.grad[0, 0].abs().sum(dim=1).numpy())
        columns = np.flatnonzero(image.grad[0, 0].abs().sum(dim=0).numpy())
        origin = field.origin(middle)
        assert origin >= 0 and origin + field.size <= 44, "pick a unit whose field fits"
        assert (rows[0], rows[-1] + 1) == (origin, origin + field.size), block
        assert (columns[0], columns[-1] + 1) == (origin, origin + field.size), block


def test_strongest_patches_are_cut_where_the_unit_looks() -> None:
    network = ConvNet(ModelConfig(blocks=((1,),), batch_norm=False, hidden_units=()))
    conv = network.blocks[0][0]
    nn.init.constant_(conv.weight, 1.0)
    nn.init.zeros_(conv.bias)
    classifier = ImageClassifier(network, [0.0], [1.0])
    images = np.zeros((4, 1, 28, 28), dtype=np.uint8)
    squares = [(5, 9, 200), (20, 13, 255), (0, 0, 100), None]  # (row, column, value); last blank
    for image, square in zip(images, squares, strict=True):
        if square is not None:
            row, column, value = square
            image[0, row : row + 2, column : column + 2] = value
    field, (found,) = strongest_patches(classifier, images, 0, channels=1, per_channel=3)
    assert field.size == 4
    assert found.image_indices == [1, 0, 2]  # brightest square first; the blank one not at all
    for patch, index in zip(found.patches, found.image_indices, strict=True):
        # The whole 2x2 square lies inside the 4x4 patch, the one in the corner too.
        assert patch.shape == (1, 4, 4)
        assert int(patch.astype(int).sum()) == 4 * squares[index][2]


def test_the_dense_baseline_is_the_narrowest_with_at_least_the_cnn_parameters() -> None:
    cnn = count_parameters(build_classifier(PRESETS["small"].config, [0.13], [0.31]))
    assert cnn == 241_770
    for layers in (1, 2):
        widths = size_dense_baseline(cnn, inputs=784, num_classes=10, layers=layers)
        network = DenseNet(DenseConfig(hidden_units=widths))
        assert count_parameters(network) == dense_parameters(784, widths, 10) >= cnn
        narrower = tuple(w - 1 for w in widths)
        assert dense_parameters(784, narrower, 10) < cnn
    assert size_dense_baseline(cnn, inputs=784, num_classes=10, layers=1) == (305,)
    assert size_dense_baseline(cnn, inputs=784, num_classes=10, layers=2) == (235, 235)
    with pytest.raises(ConfigError, match="choose one of: 1, 2"):
        size_dense_baseline(cnn, inputs=784, num_classes=10, layers=3)


def _accuracy(drops: list[float]) -> ShiftAccuracy:
    values = [0.98 - d for d in drops]
    return ShiftAccuracy((0, 1, 2), {direction: list(values) for direction in DIRECTIONS})


def test_the_verdict_follows_the_numbers() -> None:
    supports = shift_verdict(_accuracy([0, 0.01, 0.05]), _accuracy([0, 0.2, 0.5]))
    assert "No shift contradicts the claim: the numbers support it." in supports
    assert "contradict the claim at" not in supports
    against = shift_verdict(_accuracy([0, 0.2, 0.5]), _accuracy([0, 0.01, 0.05]))
    assert "The numbers contradict the claim at 1 px, 2 px, where the CNN degrades more" in against
    assert "(by 19.0, 45.0 points)" in against
    assert "Per direction, the CNN degrades more than the dense network at: up 1 px" in against
    mixed = shift_verdict(_accuracy([0, 0.05, 0.1]), _accuracy([0, 0.01, 0.3]))
    assert "contradict the claim at 1 px" in mixed and "it holds at 2 px" in mixed
    # A difference within the tolerance (one test image) is a tie, not a contradiction.
    tie = shift_verdict(_accuracy([0, 0.002, 0.1]), _accuracy([0, 0.001, 0.3]), tolerance=0.001)
    assert "The CNN degrades less than the dense network at 2 px; at 1 px the two losses " in tie
    assert "contradict the claim at" not in tie


def test_mistakes_list_the_top_two_scores() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]))
    found = mistakes(logits, np.array([0, 1, 1]))
    assert [m.index for m in found] == [1, 2]
    assert found[0].label == 1
    assert [c for c, _ in found[0].top2] == [2, 1]
    np.testing.assert_allclose([p for _, p in found[0].top2], [0.6, 0.3])

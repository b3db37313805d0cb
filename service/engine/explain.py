"""Why a model decided: occlusion sensitivity of one image, computed by the server.

The algorithm is contract/occlusion.py, the code the training report uses, so the server
explains a decision exactly as the report did. Its `predict` goes through the model's batcher:
the occluded variants share batches with other requests, are bounded by the queue (each call
holds at most max_batch_size items) and honour the request's deadline. The algorithm runs in a
worker thread and hands each batch back to the event loop; the loop never waits on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from contract.occlusion import (
    DEFAULT_STRIDE,
    Occlusion,
    check_fill,
    check_settings,
    count_positions,
    occlusion_map,
    pixel_map,
)
from service.engine.classify import Classifier
from service.engine.manager import LoadedModel
from service.errors import InvalidInput


@dataclass(frozen=True)
class Explanation:
    occlusion: Occlusion
    pixel_drops: np.ndarray


class Explainer:
    """Occlusion maps through the batcher, at most `max_positions` patch positions each."""

    def __init__(self, classifier: Classifier, max_positions: int) -> None:
        self._classifier = classifier
        self.max_positions = max_positions

    async def explain(
        self,
        model: LoadedModel,
        image: bytes,
        *,
        target: int | None,
        patch: int,
        stride: int,
        fill: Sequence[int],
        deadline: float | None,
    ) -> Explanation:
        """`patch`/`stride` 0 and `fill` empty mean the defaults (docs/service.md)."""
        channels, height, width = model.spec.input_shape
        patch = patch or max(1, min(height, width) // 4)
        stride = stride or DEFAULT_STRIDE
        try:
            check_settings(height, width, patch, stride)
            fills = check_fill(list(fill) if fill else 0, channels)
        except ValueError as error:
            raise InvalidInput(f"{error} (model input {height}x{width})") from None
        positions = count_positions(height, width, patch, stride)
        if positions > self.max_positions:
            raise InvalidInput(
                f"patch {patch} with stride {stride} gives {positions} positions on a "
                f"{height}x{width} input; this server explains at most {self.max_positions} "
                "(raise the stride or the patch)"
            )
        if target is not None and target >= len(model.spec.labels):
            raise InvalidInput(
                f"target must be a class index in 0..{len(model.spec.labels) - 1}, got {target}"
            )
        model.batcher.check_room(min(positions + 1, model.batching.max_batch_size))
        (row,) = await self._classifier.decode(model, [image])
        loop = asyncio.get_running_loop()
        stopped = threading.Event()

        def predict(images: np.ndarray) -> np.ndarray:
            if stopped.is_set():
                raise asyncio.CancelledError("the call ended")
            return asyncio.run_coroutine_threadsafe(
                model.batcher.infer(images, deadline), loop
            ).result()

        try:
            occlusion = await asyncio.to_thread(
                occlusion_map, predict, row, patch=patch, stride=stride, fill=fills,
                target=target, batch_size=model.batching.max_batch_size,
            )  # fmt: skip
        finally:
            stopped.set()  # a cancelled call sends no further batch
        pixels = pixel_map(occlusion.drops, occlusion.tops, occlusion.lefts, patch, height, width)
        return Explanation(occlusion, pixels)

"""The classification path: encoded images -> decode -> batch -> logits -> top-k probabilities.

No gRPC in here: the Classify servicer resolves the model, calls `Classifier.classify()` and
encodes the answer. Decoding runs in a thread pool (Pillow releases the GIL for most of it),
so the event loop keeps serving while images are decoded; a call whose images are too small
for the hand-off to pay is decoded on the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

from service.engine.batcher import RequestTiming
from service.engine.images import DEFAULT_IMAGE_FORMATS, decode_image, header_pixels
from service.engine.results import ScoredClass, top_k
from service.errors import InvalidInput

if TYPE_CHECKING:
    from service.engine.manager import LoadedModel

DEFAULT_TOP_K = 5
# A call whose images hold at most this many pixels in all is decoded on the event loop (each
# image counted at its own size or the model's input size, whichever is larger: the resize
# writes the latter): a 28 x 28 PNG decodes in about 30 µs and a 64 x 64 one in 55, while the
# hand-off to a decode thread and back costs about 100 µs of CPU and as much latency (measured
# on the 2-core build machine). Anything more (a 224 x 224 RGB PNG alone: ~0.7 ms) goes to the
# thread pool, so the loop keeps serving meanwhile.
INLINE_DECODE_MAX_PIXELS = 64 * 64
# ... and each image at most this many bytes (a 64 x 64 RGB PNG of noise is 12 KB): a small
# header over a large file (chunks a decoder still walks) goes to the pool too.
INLINE_DECODE_MAX_BYTES = 64 * 1024


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 for stability."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Classifier:
    """Classifies encoded images with a loaded model, within the server's limits."""

    def __init__(
        self,
        decode_executor: Executor,
        *,
        max_image_bytes: int,
        max_image_pixels: int,
        max_top_k: int,
        image_formats: Sequence[str] = DEFAULT_IMAGE_FORMATS,
    ) -> None:
        self._executor = decode_executor
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_top_k = max_top_k
        self.image_formats = tuple(image_formats)

    def effective_top_k(self, requested: int, classes: int) -> int:
        """0 means DEFAULT_TOP_K; above max_top_k is refused; capped at the class count."""
        if requested > self.max_top_k:
            raise InvalidInput(f"top_k must be at most {self.max_top_k}, got {requested}")
        return min(requested or DEFAULT_TOP_K, classes)

    async def decode(self, model: LoadedModel, images: Sequence[bytes]) -> np.ndarray:
        """Decodes every image, on the loop when the call is small (`_small`), else in the
        thread pool; uint8 [N, C, H, W] in request order."""
        if not images:
            raise InvalidInput("the request holds no images; send at least one")
        if self._small(model, images):
            return np.stack([self._decode_one(model, i, data) for i, data in enumerate(images)])
        loop = asyncio.get_running_loop()
        rows = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._decode_one, model, i, data)
              for i, data in enumerate(images))
        )  # fmt: skip
        return np.stack(rows)

    def _small(self, model: LoadedModel, images: Sequence[bytes]) -> bool:
        """True when decoding `images` on the loop costs less than handing them off: at most
        INLINE_DECODE_MAX_PIXELS in all (read from the headers, each image counted at the
        larger of its size and the model's input size), each at most INLINE_DECODE_MAX_BYTES.
        Stops reading headers as soon as the answer is no."""
        p = model.spec.preprocessing
        target = p.width * p.height
        budget = INLINE_DECODE_MAX_PIXELS
        byte_limit = min(self.max_image_bytes, INLINE_DECODE_MAX_BYTES)
        for data in images:
            if len(data) > byte_limit or budget < target:
                return False
            pixels = header_pixels(data, self.image_formats)
            if pixels is None:  # unreadable: the pool's decode says why
                return False
            budget -= max(pixels, target)
            if budget < 0:
                return False
        return True

    def _decode_one(self, model: LoadedModel, position: int, data: bytes) -> np.ndarray:
        started = time.perf_counter()
        try:
            row = decode_image(
                data,
                model.spec.preprocessing,
                max_bytes=self.max_image_bytes,
                max_pixels=self.max_image_pixels,
                formats=self.image_formats,
            )
        except InvalidInput as error:
            raise InvalidInput(f"image {position}: {error}") from None
        model.metrics.image_decode.observe(time.perf_counter() - started)
        return row

    async def classify(
        self,
        model: LoadedModel,
        images: Sequence[bytes],
        top_k_requested: int,
        deadline: float | None = None,
        timing: RequestTiming | None = None,
    ) -> list[list[ScoredClass]]:
        """The top-k classes of each image, in request order; `timing` gets where the time
        went (decode = input, top-k = output)."""
        timing = timing if timing is not None else RequestTiming()
        started = time.perf_counter()
        k = self.effective_top_k(top_k_requested, len(model.spec.labels))
        if images:  # refuse what the queue cannot take before decoding anything
            model.batcher.check_room(len(images))
        batch = await self.decode(model, images)
        timing.input_s = time.perf_counter() - started
        logits = await model.batcher.infer(batch, deadline, timing)
        computed = time.perf_counter()
        results = top_k(softmax(logits), k, model.spec.labels)
        timing.output_s = time.perf_counter() - computed
        return results

"""The gRPC servicers: decode, await the batcher, encode. Nothing else happens here.

`InferenceServicer` is the KServe V2 `inference.GRPCInferenceService`; `ClassificationServicer`
is `convserve.v1.ImageClassification`. Errors are raised as domain exceptions and turned into
status codes by `service.wire.status.Call`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc

from service._proto import classification_pb2 as cls_pb2
from service._proto import classification_pb2_grpc as cls_grpc
from service._proto import grpc_service_pb2 as pb2
from service._proto import grpc_service_pb2_grpc as pb2_grpc
from service.engine.admission import Admission
from service.engine.batcher import RequestTiming
from service.engine.classify import Classifier
from service.engine.explain import Explainer
from service.engine.manager import LoadedModel, ModelManager
from service.errors import InvalidInput, ModelNotReady, NotImplementedRpc, client_text
from service.observability.metrics import Metrics
from service.wire import converters, model_messages
from service.wire.status import Call

SERVER_NAME = "convserve"
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics")
INFERENCE_SERVICE = "inference.GRPCInferenceService"
IMPLEMENTED = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
    "RepositoryModelUnload",
)  # fmt: skip
# RepositoryModelUnload parameters Triton clients send; convserve has no ensembles, so
# unloading dependents is a no-op.
UNLOAD_PARAMETERS = ("unload_dependents",)
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _unimplemented(method: str) -> NotImplementedRpc:
    return NotImplementedRpc(
        f"{INFERENCE_SERVICE}/{method} is not implemented by {SERVER_NAME}; "
        f"implemented: {', '.join(IMPLEMENTED)} (and convserve.v1.ImageClassification/Classify)"
    )


class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    """KServe V2 / Open Inference Protocol over gRPC."""

    def __init__(
        self,
        models: ModelManager,
        metrics: Metrics,
        *,
        admission: Admission,
        server_ready: Callable[[], bool],
        max_top_k: int,
        version: str,
    ) -> None:
        self._models = models
        self._metrics = metrics
        self._admission = admission
        self._server_ready = server_ready
        self._max_top_k = max_top_k
        self._version = version

    async def ServerLive(self, request: pb2.ServerLiveRequest, context: Context) -> Any:
        return pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb2.ServerReadyRequest, context: Context) -> Any:
        return pb2.ServerReadyResponse(ready=self._server_ready())

    async def ModelReady(self, request: pb2.ModelReadyRequest, context: Context) -> Any:
        async with Call("ModelReady", context, admission=self._admission):
            return pb2.ModelReadyResponse(
                ready=self._models.is_ready(request.name, request.version)
            )

    async def ServerMetadata(self, request: pb2.ServerMetadataRequest, context: Context) -> Any:
        return pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request: pb2.ModelMetadataRequest, context: Context) -> Any:
        async with Call("ModelMetadata", context, admission=self._admission):
            model = self._models.resolve(request.name, request.version)
            ready = [str(v.spec.version) for v in self._models.ready_versions(model.spec.name)]
            return converters.model_metadata(model.spec, ready)

    async def ModelInfer(self, request: pb2.ModelInferRequest, context: Context) -> Any:
        async with Call("ModelInfer", context, self._metrics, self._admission) as call:
            # The lease keeps the version from being unloaded until it has answered.
            with self._models.lease(request.model_name, request.model_version) as model:
                call.bind(model.metrics)
                return await self._infer(request, model, call)

    async def _infer(self, request: pb2.ModelInferRequest, model: LoadedModel, call: Call) -> Any:
        timing = RequestTiming()
        started = time.perf_counter()
        checked = converters.checked_input(request, model.spec)
        outputs = converters.requested_outputs(request, model.spec, self._max_top_k)
        model.batcher.check_room(checked.shape[0])  # refuse before converting anything
        if checked.costly:  # a long pass over typed contents: keep the loop free
            images = await asyncio.to_thread(checked.convert)
        else:
            images = checked.convert()
        timing.input_s = time.perf_counter() - started
        deadline = call.deadline(converters.request_timeout_s(request))
        values = await model.batcher.infer(images, deadline, timing)
        computed = time.perf_counter()
        response = converters.encode_infer_response(request, model.spec, outputs, values)
        timing.output_s = time.perf_counter() - computed
        model.metrics.statistics.computed(timing)
        return response

    async def ModelConfig(self, request: pb2.ModelConfigRequest, context: Context) -> Any:
        async with Call("ModelConfig", context, admission=self._admission):
            model = self._models.resolve(request.name, request.version)
            policy = self._models.record(model.spec.name).policy
            return pb2.ModelConfigResponse(config=model_messages.model_config(model, policy))

    async def ModelStatistics(self, request: pb2.ModelStatisticsRequest, context: Context) -> Any:
        async with Call("ModelStatistics", context, admission=self._admission):
            if request.name:
                if request.version:
                    models = [self._models.resolve(request.name, request.version)]
                else:
                    models = self._models.ready_versions(self._models.record(request.name).name)
            elif request.version:
                raise InvalidInput("a version needs a model name")
            else:
                models = [
                    model
                    for name in self._models.loaded_names()
                    for model in self._models.ready_versions(name)
                ]
            return pb2.ModelStatisticsResponse(
                model_stats=[
                    model_messages.model_statistics(
                        m.spec.name, m.spec.version, m.metrics.statistics
                    )
                    for m in models
                ]
            )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        async with Call("ModelStreamInfer", context):
            raise _unimplemented("ModelStreamInfer")
        yield  # an async generator: the shape gRPC expects of a streaming handler

    async def RepositoryIndex(self, request: pb2.RepositoryIndexRequest, context: Context) -> Any:
        async with Call("RepositoryIndex", context, admission=self._admission):
            rows = await self._models.index(ready_only=request.ready)
            return model_messages.repository_index(rows)

    async def RepositoryModelLoad(
        self, request: pb2.RepositoryModelLoadRequest, context: Context
    ) -> Any:
        async with Call("RepositoryModelLoad", context, admission=self._admission):
            self._check_explicit("load")
            if request.parameters:
                raise InvalidInput(
                    f"unsupported load parameter {client_text(sorted(request.parameters)[0])}; "
                    "RepositoryModelLoad takes no parameters here (the model's config.json "
                    "configures it)"
                )
            await self._models.load(_model_name(request.model_name))
            return pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb2.RepositoryModelUnloadRequest, context: Context
    ) -> Any:
        async with Call("RepositoryModelUnload", context, admission=self._admission):
            self._check_explicit("unload")
            unknown = sorted(set(request.parameters) - set(UNLOAD_PARAMETERS))
            if unknown:
                raise InvalidInput(
                    f"unsupported unload parameter {client_text(unknown[0])}; supported: "
                    f"{', '.join(UNLOAD_PARAMETERS)}"
                )
            await self._models.unload(_model_name(request.model_name))
            return pb2.RepositoryModelUnloadResponse()

    def _check_explicit(self, what: str) -> None:
        """Triton's answer outside model control mode explicit: UNAVAILABLE."""
        mode = self._models.mode
        if mode != "explicit":
            raise ModelNotReady(
                f"explicit model {what} is not allowed in model control mode {mode}"
                + (": the server polls the repository" if mode == "poll" else "")
                + "; start the server with --model-control-mode explicit"
            )


def _model_name(name: str) -> str:
    if not name:
        raise InvalidInput("model_name is empty; name the model to load or unload")
    return name


class UnknownInferenceMethods(grpc.GenericRpcHandler):
    """Answers Triton-only RPCs of the same service (ModelConfig, ModelStatistics, shared
    memory, ...) with UNIMPLEMENTED and the list of what is implemented."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        prefix = f"/{INFERENCE_SERVICE}/"
        if not method.startswith(prefix):
            return None
        name = method[len(prefix) :]

        async def answer(request_iterator: AsyncIterator[bytes], context: Context) -> None:
            async with Call(name, context):
                raise _unimplemented(client_text(name, quote=False))

        return grpc.stream_stream_rpc_method_handler(answer)


class ClassificationServicer(cls_grpc.ImageClassificationServicer):
    """convserve.v1.ImageClassification: encoded images in, top-k labels out; and why."""

    def __init__(
        self,
        models: ModelManager,
        metrics: Metrics,
        classifier: Classifier,
        admission: Admission,
        explainer: Explainer,
    ) -> None:
        self._models = models
        self._metrics = metrics
        self._classifier = classifier
        self._admission = admission
        self._explainer = explainer

    async def Classify(self, request: cls_pb2.ClassifyRequest, context: Context) -> Any:
        async with Call("Classify", context, self._metrics, self._admission) as call:
            with self._models.lease(request.model_name, request.model_version) as model:
                call.bind(model.metrics)
                timing = RequestTiming()
                results = await self._classifier.classify(
                    model, request.images, request.top_k, call.deadline(), timing
                )
                model.metrics.statistics.computed(timing)
                return converters.classify_response(model.spec, results)

    async def Explain(self, request: cls_pb2.ExplainRequest, context: Context) -> Any:
        async with Call("Explain", context, self._metrics, self._admission) as call:
            with self._models.lease(request.model_name, request.model_version) as model:
                call.bind(model.metrics)
                explanation = await self._explainer.explain(
                    model,
                    request.image,
                    target=request.target if request.HasField("target") else None,
                    patch=request.patch,
                    stride=request.stride,
                    fill=list(request.fill),
                    deadline=call.deadline(),
                )
                return converters.explain_response(model.spec, explanation)

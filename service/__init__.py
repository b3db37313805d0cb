"""convserve inference server: model repository -> ONNX Runtime -> dynamic batcher -> gRPC.

Start it with `python -m service --model-repository PATH` (see docs/service.md).
"""

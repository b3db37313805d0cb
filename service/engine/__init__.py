"""The engine: the model manager and its lifecycle, the batcher, ONNX Runtime, image
decoding, results and statistics. No gRPC and no protobuf in here."""

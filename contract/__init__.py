"""The contract between `training` (which writes the model repository) and `service` (which
serves it): the repository layout and names, the metadata keys and tensor names, and the one
preprocessing recipe that turns a decoded image into model input (docs/model-repository.md),
and when ONNX Runtime's threads spin (`runtime`: the service's rule, which the training
package's INT8 benchmark follows).

Both halves import it; it imports neither, nor torch, nor grpc: only numpy and Pillow.
"""

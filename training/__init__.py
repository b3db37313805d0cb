"""Train a convolutional image classifier, export it to ONNX, write it into a model repository.

Entry point: ``python -m training --help`` (see ``training.cli``). Importing this package does
no work; PyTorch is only imported by the modules that need it.
"""

"""Running a bundle's network: the engines (PyTorch, ONNX Runtime), which one a bundle gets, batching,
and the in-memory ONNX graph of training's passes. The bottom of the inference stack: it knows
bundles, models and arrays, and nothing of predictors, unknown images, training or export.

This module stays light (no torch/onnx import): the CLI and `effitune.export` read `ONNX_FILES`.
"""

# Predictor backend name -> file inside the bundle (`effitune export` writes them).
ONNX_FILES = {"onnx": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

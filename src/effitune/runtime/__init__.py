"""Running a bundle's network: the engines (PyTorch, ONNX Runtime, OpenVINO, LiteRT), which one a bundle
gets, batching, and the in-memory ONNX graph of training's passes. The bottom of the inference stack: it
knows bundles, models and arrays, and nothing of predictors, unknown images, training or export.

This module stays light (no torch/onnx import): the CLI and `effitune.export` read the file names.
"""

# Predictor backend name -> file inside the bundle (`effitune export` writes them).
ONNX_FILES = {"onnx": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
OPENVINO_FILES = {"openvino": "model.openvino.xml", "openvino-int8": "model.int8.openvino.xml"}  # + .bin beside
TFLITE_FILES = {"tflite": "model.tflite", "tflite-int8": "model.int8.tflite"}
EXPORT_FILES = {**ONNX_FILES, **OPENVINO_FILES, **TFLITE_FILES}

# The `effitune export` options that write each backend's file (what a missing file's error tells to run).
EXPORT_OPTIONS = {"onnx": "--format onnx", "fp16": "--format onnx --fp16", "int8": "--format onnx --int8",
                  "openvino": "--format openvino", "openvino-int8": "--format openvino --int8",
                  "tflite": "--format tflite", "tflite-int8": "--format tflite --int8"}

# Quantized backends: judged on accuracy against their float graph, with unknown-image thresholds of their own.
QUANTIZED = ("int8", "openvino-int8", "tflite-int8")

# What each backend needs installed beyond effitune's core (the extra that brings it).
EXTRAS = {"onnx": "export", "fp16": "export", "int8": "export", "openvino": "openvino", "openvino-int8": "openvino",
          "tflite": "tflite", "tflite-int8": "tflite"}

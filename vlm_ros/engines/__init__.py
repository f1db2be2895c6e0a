"""Compiled and quantized forms of the model's stages, each beside its PyTorch reference:
ONNX export, ONNX Runtime, TensorRT, oneDNN CPU Linear and weight-only int8. Builds on
``vlm_ros.model``; never imports ``vlm_ros.infer`` (inference chooses an engine, not the
other way round)."""

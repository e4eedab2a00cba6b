"""One module per target: executorch (ONNX and Core ML land with their issues)."""

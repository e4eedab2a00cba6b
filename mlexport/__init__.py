"""mlexport: put small language models on phones (ExecuTorch, Core ML, ONNX)."""

__version__ = "0.1.0"

"""Getting models out: export (ONNX, torch.export, safetensors) and the HTTP server."""

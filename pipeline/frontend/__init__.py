"""What an ONNX export needs before any stage sees it (normalisation), below the stages."""

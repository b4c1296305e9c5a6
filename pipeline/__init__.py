"""onnx2deploy: an incremental build pipeline from an ONNX model to a deployable TVM artifact.

One module per stage (source, quantize, importer, tune, build, package, smoke, validate,
bench), plus the shared pieces they stand on: spec, targets, hashing, store, errors.
"""

__version__ = "0.1.0"

"""The project's own Relax passes: QDQ fake quantization to integer arithmetic, and its layout."""

"""The face-model library: model specs, packs, image decoding and face geometry.

Stages import from here, never from each other. `spec` imports nothing heavy,
so a service that only needs a dimension or a threshold never loads OpenCV.
"""

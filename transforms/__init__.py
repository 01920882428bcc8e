"""Reusable pieces of the Grad-CAM audit pipeline.

`transforms.cam` holds the TensorFlow maths (no Beam); the other modules hold
the Beam steps, the model handler, the Arrow schemas and the class statistics.
TensorFlow is imported lazily everywhere Beam may pickle an object.
"""

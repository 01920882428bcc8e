"""Pure TensorFlow class activation maps: methods, targets, layers, explainer.

Nothing here imports Beam. TensorFlow is imported inside functions so that
importing the package stays cheap.
"""

from transforms.cam.methods import METHODS
from transforms.cam.targets import TargetSpec, parse_target

__all__ = ["METHODS", "TargetSpec", "parse_target"]

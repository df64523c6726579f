"""``nvp3d.predict`` is the documented function; there is no module of that name to shadow it."""

from __future__ import annotations

import importlib.util


def test_nvp3d_predict_is_the_function() -> None:
    import nvp3d
    import nvp3d.inference.run  # noqa: F401 - the inference action imports the predictor
    from nvp3d.inference.predictor import predict

    assert nvp3d.predict is predict
    assert importlib.util.find_spec("nvp3d.predict") is None  # ``import nvp3d.predict as p`` cannot mislead

"""``nvp3d.predict`` is the documented function even after other modules import the ``nvp3d.predict`` module."""

from __future__ import annotations

import sys


def test_nvp3d_predict_is_the_function_after_submodule_imports() -> None:
    import nvp3d
    import nvp3d.inference.runner  # noqa: F401 - imports ``from nvp3d.predict import ...``
    from nvp3d.predict import Predictor  # noqa: F401

    assert callable(nvp3d.predict)
    assert nvp3d.predict is sys.modules["nvp3d.predict"].predict

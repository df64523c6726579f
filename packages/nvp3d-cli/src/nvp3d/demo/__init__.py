"""``nvp3d demo`` and the specs for synthetic data.

* :mod:`~nvp3d.demo.specs` -- every spec for data made by ``datasets3d.synth`` (demo, references examples).
* :mod:`~nvp3d.demo.run` -- the demo (2D stage), :mod:`~nvp3d.demo.run3d` -- its 3D half.
"""

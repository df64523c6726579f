"""``python -m nvp3d``: the same command line as the ``nvp3d`` console script (useful where only the
interpreter is on PATH, or under launchers such as ``torchrun -m nvp3d``)."""

from nvp3d.cli import main

if __name__ == "__main__":
    main()

"""The demo's data sizes, in a module of their own so that ``nvp3d.cli`` can name them as option defaults without
importing the training code."""

from __future__ import annotations

__all__ = ["DEMO_EXTRA_TEST_SCENES", "DEMO_FRAMES_PER_SCENE", "DEMO_SCENES"]

#: Rooms the demo generates, and camera views of each (``datasets3d.synth.generate``): 40 rooms of one view each,
#: split 80/10/10 into 32 training rooms, 4 validation rooms and 4 held-out rooms. Until nvp3d-cli 0.3.14 the demo
#: trained on 8 rooms of 4 views (the same 32 training frames, the same 768 steps). The tiny model fits 8 rooms and
#: finds almost no furniture in a new one: twice the steps raise the training frames' things PQ from 37-49 to 66-75
#: and the held-out things PQ not at all (stop 39, docs/learning.md). With 32 different rooms the same frames and
#: steps generalise better: held-out 2D things PQ on 8 common unseen rooms, seeds 0-3, 18.3 / 9.4 / 10.1 / 16.3
#: against 0.0 / 4.8 / 9.3 / 9.5 (16 other rooms: 14.7 / 8.3 / 7.6 / 12.1 against 5.3 / 8.7 / 10.3 / 6.0).
DEMO_SCENES = 40
DEMO_FRAMES_PER_SCENE = 1

#: Unseen rooms the demo adds to its test split (``datasets3d.synth.generate(extra_test_scenes=...)``), beyond the
#: 4 that the 80/10/10 split of its 40 rooms holds out: its held-out metrics average over 32 rooms (32 frames, 84-89
#: GT things in 2D and 109-125 in 3D over seeds 0-5). One room's things PQ swings by tens of points (stop 38: seed 0
#: scored things PQ 19.4 on its one held-out room and 0.0 on 8 other rooms). The training rooms do not depend on it
#: (each room has its own random stream).
DEMO_EXTRA_TEST_SCENES = 28

"""Domain decomposition (the CNN-DNN of Klawonn, Lanser, Weber): images cut into subimages, one small local CNN
per subimage, their class probabilities combined by a dense net, the mean or a vote."""

from __future__ import annotations

import math


def local_width(base_width: float, share: float) -> float:
    """The width of a local CNN whose subimage holds `share` of the image's pixels.

    A conv layer's parameters grow with width² (input × output channels), so width × √share gives the local
    CNN about `share` of the global CNN's parameters: a 2×2 grid's local CNNs at width 0.5 have about a
    quarter of them each (the first conv and the classifier scale only linearly, so a little more)."""
    return base_width * math.sqrt(share)

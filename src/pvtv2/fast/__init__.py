"""The fast inference paths, kept apart from the reference model they must equal.

``pvtv2.models.layers.PvtV2Stage.forward`` hands over to :func:`stage_forward` at one point when :func:`applies`
says so. The contract, the switch and the explicit packing step are described in :mod:`pvtv2.fast.cpu`:

- ``with pvtv2.fast.fast_path(False): ...`` runs the reference path in a block (this thread only);
  ``PVTV2_FAST_PATH=0`` does so for a whole program;
- ``pvtv2.fast.freeze(model)`` packs the weights for oneDNN once (what the ``pvtv2`` command does for inference);
  ``pvtv2.fast.unfreeze(model)`` drops them.
"""

from .cpu import (
    FAST_PATH_ENV,
    applies,
    fast_path,
    fast_path_available,
    fast_path_enabled,
    freeze,
    is_frozen,
    plain_modules,
    stage_forward,
    unfreeze,
)

__all__ = [
    "FAST_PATH_ENV",
    "applies",
    "fast_path",
    "fast_path_available",
    "fast_path_enabled",
    "freeze",
    "is_frozen",
    "plain_modules",
    "stage_forward",
    "unfreeze",
]

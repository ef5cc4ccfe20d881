"""What one attention layer adds to plain causal attention, as the ``"hdp"`` attention passes it down.

:class:`LayerFeatures` travels from :mod:`.interface` through :mod:`.segments` into the ring
(:mod:`.ring`), the windowed exchange (:mod:`.halo`) and the head-parallel pieces (:mod:`.ulysses`):

- ``mask``: a :class:`~hf_hdp.planning.reach.LayerMask`, the layer's sliding window and/or attention chunk.
  Local sequences run it in the kernels (window) and by cutting sequences at chunk boundaries; distributed
  segments exchange only the rows it reaches (:mod:`.halo`).
- ``softcap``: attention logit soft-capping, applied per score in every kernel call (the backend contract's
  ``softcap``); the log-sum-exp merge is unchanged.

Attention sinks are a tensor (a learned logit per head, with a gradient), so they travel beside the
features as ``sinks`` (:mod:`.sinks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..planning.reach import FULL, LayerMask


@dataclass(frozen=True)
class LayerFeatures:
    mask: LayerMask = FULL
    softcap: float | None = None

    def for_length(self, length: int) -> LayerFeatures:
        """These features with the mask parts a sequence of ``length`` tokens cannot feel removed."""
        mask = self.mask.for_length(length)
        return self if mask == self.mask else LayerFeatures(mask, self.softcap)

    def kernel(self, window: bool = True) -> dict:
        """The backend contract's keywords: ``window`` (when asked for) and ``softcap``."""
        return {"window": self.mask.window if window else None, "softcap": self.softcap}


PLAIN = LayerFeatures()

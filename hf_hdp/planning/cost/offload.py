"""Activation offloading's time: the host copies compute does not hide (:mod:`hf_hdp.engine.offload`; pure Python).

:meth:`~.timing.TimeTerms.micro_batch_breakdown` adds :meth:`OffloadTime.offload_exposed_time` for a fixed
``HDPConfig.offload_ratio``; :meth:`OffloadTime.hidden_offload_ratio` is ByteScale's rule for ``"auto"``.
"""

from __future__ import annotations

from .specs import FWD_BWD


class OffloadTime:
    """The offloading methods of a :class:`~.model.CostModel` (a mixin: the fields are the model's)."""

    def micro_batch_attention_time(self, mb) -> float:
        """The attention (quadratic) part of a :class:`~hf_hdp.planning.plan.MicroBatch`'s time on its
        rank, all layers: each whole sequence's :meth:`attention_time`, and ``1/k`` of it for a piece
        of a sequence split over ``k`` ranks (zigzag balances the causal work)."""
        return sum(self.attention_time(p.length) / max(len(p.group), 1) for p in mb.pieces)

    def offload_bytes(self, tokens: float, layers: int, checkpointing: bool = False) -> float:
        """Bytes that offloading ``layers`` decoder layers of a micro-batch of ``tokens`` tokens moves
        to the host (and back): what each layer saves for backward, or only its input when the layers
        are recomputed (``checkpointing``)."""
        per = self.layer_input_bytes_per_token if checkpointing else self.layer_saved_bytes_per_token
        return float(tokens) * layers * per

    def host_copy_time(self, nbytes: float) -> float:
        """One copy of ``nbytes`` between device and host memory, one way: ``nbytes / host_bandwidth``
        (infinite when the bandwidth is unknown, 0)."""
        if nbytes <= 0:
            return 0.0
        if self.host_bandwidth <= 0:
            return float("inf")
        return nbytes / self.host_bandwidth

    def hidden_offload_ratio(self, tokens: float, attention_s: float, checkpointing: bool = False) -> float:
        """ByteScale's rule for ``offload_ratio="auto"``: the largest fraction ``r`` of a micro-batch's
        saved activations (all layers) whose device-to-host copy takes no longer than the micro-batch's
        forward attention, ``attention_s / FWD_BWD`` (``attention_s`` is forward plus backward, as
        :meth:`micro_batch_attention_time` gives it), capped at 1.

        The forward's copy is the binding one: the copy back in backward has twice the compute to hide
        behind (:data:`~.specs.FWD_BWD`). 0 when :attr:`host_bandwidth` is unknown, 1 when nothing is saved.
        """
        total = self.offload_bytes(tokens, self.num_layers, checkpointing)
        if total <= 0:
            return 1.0
        if self.host_bandwidth <= 0 or attention_s <= 0:
            return 0.0
        return min(1.0, attention_s / FWD_BWD * self.host_bandwidth / total)

    def offload_exposed_time(
        self, tokens: float, attention_s: float, layers: int, checkpointing: bool = False
    ) -> float:
        """Seconds of offloading ``layers`` layers that compute does not hide: the copy to the host
        beyond the forward attention, plus the copy back beyond the backward attention."""
        copy = self.host_copy_time(self.offload_bytes(tokens, layers, checkpointing))
        forward = attention_s / FWD_BWD
        return max(0.0, copy - forward) + max(0.0, copy - (attention_s - forward))

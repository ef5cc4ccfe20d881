"""NEFTune (Jain et al., arXiv 2310.05914) per sample, for packed and split micro-batches.

NEFTune adds uniform noise ``U(-m, m)`` to the input embeddings in training, with
``m = alpha / sqrt(L * d)`` for a sample of ``L`` tokens and hidden size ``d``. Stock Trainer's hook
takes ``L`` from the tensor's sequence dimension, which under HDP is the packed micro-batch (many
samples, or one shard of a long one). :class:`PerSampleNEFTune` instead gives every token the ``m``
of the whole sample (document) it belongs to, read from the micro-batch's HDP metadata, so each
sample gets the noise it would get alone.
"""

from __future__ import annotations

import torch


def token_sample_lengths(meta) -> torch.Tensor:
    """For each row of a packed micro-batch, the length of the whole sample (document) it belongs to."""
    parts = [torch.full((n,), n, dtype=torch.float32) for n in meta.local_seqlens]
    for seg in meta.rings:
        for rows, total in zip(seg.rows_per_doc(), seg.doc_lengths()):
            parts.append(torch.full((rows,), total, dtype=torch.float32))
    return torch.cat(parts) if parts else torch.zeros(0)


class PerSampleNEFTune:
    """Hooks on a causal LM: a pre-hook reads each forward's ``hdp_metadata``, the embeddings' hook adds the noise."""

    def __init__(self, alpha: float):
        self.alpha = float(alpha)
        self.meta = None
        self.handles: list = []

    def attach(self, model: torch.nn.Module) -> None:
        if not self.handles:
            self.handles = [
                model.register_forward_pre_hook(self._read_metadata, with_kwargs=True),
                model.get_input_embeddings().register_forward_hook(self._add_noise),
            ]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.meta = None

    def _read_metadata(self, module, args, kwargs):
        self.meta = kwargs.get("hdp_metadata")

    def _add_noise(self, module, inputs, output):
        if not module.training or self.meta is None:
            return output
        lengths = token_sample_lengths(self.meta).to(output.device)
        if lengths.numel() != output.shape[1]:
            raise RuntimeError(f"NEFTune: {lengths.numel()} sample lengths for {output.shape[1]} embedded tokens")
        mag = (self.alpha / torch.sqrt(lengths * output.shape[-1])).to(output.dtype)[None, :, None]
        return output + torch.empty_like(output).uniform_(-1, 1) * mag

"""Combining decoded updates and compressing the result for the download path.

An aggregator decodes the updates it accepts, combines them (training/combine.py: a weighted mean or
a robust rule), and sends the result back to every peer. A dense fp32 download of a 1B model is 4 GB (320 s at
100 Mbit/s), so the mean is compressed too. Two ways, and why this module does the first:

- **Re-sparsify with the aggregator's own error feedback** (`encode_aggregate`): the mean goes
  through the same codec as the uploads, with a residual the aggregator keeps across rounds, so
  what one aggregate drops is sent in later ones. The download is then exactly one upload's size
  (~0.027 bytes/param with ``dct-topk`` defaults), whatever the number of peers.
- **Sparse union** (not implemented): send the union of the accepted updates' kept coefficients
  with their averaged values. It adds no error, but m peers with k of 256 entries per chunk give
  ~``256 * (1 - (1 - k/256)**m)`` distinct positions per chunk, and averaged values no longer
  fit 2 bits (8 are needed): with dct-topk defaults about 0.11 bytes/param for 4 peers and 0.39
  for 20, i.e. roughly one upload per peer, growing with m. Forwarding the m uploads unchanged
  costs exactly m uploads and needs no new format. Re-sparsifying at a higher density (the
  run config's ``aggregate_codec``, e.g. ``density = m / 64``) gets most of the union's benefit
  at a download of m uploads' size, with this same function.

Whichever way, everyone (aggregator included) applies ``codec.decode(payload, spec)``, never the
aggregator's in-memory mean, so all replicas stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from potluck.protocol.codecs.base import Codec


def encode_aggregate(mean: Mapping[str, torch.Tensor], *, codec: Codec, state: dict[str, torch.Tensor]) -> bytes:
    """The aggregate's payload: ``mean`` re-compressed by ``codec`` with the aggregator's residual.

    ``state`` is the aggregator's error-feedback residual (``{}`` at first; keep it across rounds
    and checkpoint it with the master state). The payload is the size of one upload. Apply
    ``codec.decode(payload, spec)`` on the aggregator too, not ``mean``: that is what peers apply.
    """
    return codec.encode(mean, state)

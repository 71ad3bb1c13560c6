"""Before any real collective: do all ranks run the same operation on the same structure? (One small all-gather.)

A rank that fails its local checks still joins this all-gather, so its peers learn of the failure and raise too
instead of waiting for it in the next collective. Structures that must match (the parameter list, the ratios)
are compared through digests; a mismatch names each rank's summary.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from salun_ext.distributed.runtime import Collectives, DistributedError

PAYLOAD_LIMIT = 1024  # bytes per rank: the agreement costs world_size KiB per rank at most


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def agree(
    comm: Collectives,
    *,
    error: BaseException | None,
    fields: dict[str, tuple[str, str]] | None = None,
    summary: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """All-gather status, digests and summaries; raise on any rank's error or any mismatch.

    Args:
        error: this rank's local failure (re-raised here after the others learned of it), or None.
        fields: name -> (canonical text that must be equal on every rank, short human description).
        summary: small JSON-able facts about this rank (returned for every rank).
    Returns every rank's summary, indexed by rank.
    """
    fields = fields or {}
    message = None if error is None else f"{type(error).__name__}: {error}"[:600]
    payload = {
        "error": message,
        "digests": {k: digest(v[0]) for k, v in fields.items()},
        "describe": {k: v[1][:120] for k, v in fields.items()},
        "summary": summary or {},
    }
    text = json.dumps(payload, separators=(",", ":"))
    if len(text.encode()) > PAYLOAD_LIMIT:  # keep the digests, drop the long descriptions
        payload["describe"] = {k: "" for k in fields}
        text = json.dumps(payload, separators=(",", ":"))
    ranks = [json.loads(b.decode()) for b in comm.all_gather_bytes(text.encode(), PAYLOAD_LIMIT)]

    failed = [(r, p["error"]) for r, p in enumerate(ranks) if p["error"] is not None]
    if error is not None:
        raise error
    if failed:
        first = "; ".join(f"rank {r}: {msg}" for r, msg in failed[:4])
        raise DistributedError(f"{comm.what}: {len(failed)} of {comm.world} rank(s) failed their input checks: {first}")
    for name in fields:
        values = [p["digests"].get(name) for p in ranks]
        if len(set(values)) > 1:
            detail = "; ".join(f"rank {r}: {p['describe'].get(name, '?')}" for r, p in enumerate(ranks[:8]))
            raise DistributedError(
                f"{comm.what}: the ranks disagree on {name} (every rank must pass the same {name}): {detail}"
            )
    return [p["summary"] for p in ranks]

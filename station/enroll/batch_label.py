"""The batch a request authenticated by a device's certificate may name in its path.

EST re-enrolment (``/.well-known/est/[{label}/]simplereenroll``) and CMP's signed
requests (``/.well-known/cmp/p/{label}/...``: ``kur``, a signed ``cr``/``p10cr``,
``rr``) are authenticated by the board's current certificate, and that
certificate belongs to a batch. The label of the path names a batch too (its
subject template, validity, key mode), so a board renews in its own batch only:
a label naming another batch (or none that exists) is refused, not quietly
ignored. No label (EST's unlabelled paths, all strongSwan ``pki --est`` can send)
means the board's own batch, whatever ``STATION_EST_DEFAULT_BATCH`` names: that
default is for first enrolments, which have no certificate to name a batch.
"""

from __future__ import annotations

from station.errors import Kind, StationError


class OtherBatch(StationError):
    code = "renewal-other-batch"
    kind = Kind.FORBIDDEN


def renewal_batch(label: str | None, batch: str, device_id: str) -> str:
    """The batch a certificate-authenticated request acts in: ``batch``, the device's.

    Codes: renewal-other-batch (the label names another batch).
    """
    if label is not None and label != batch:
        raise OtherBatch(
            f"device {device_id!r} belongs to batch {batch!r}; its certificate is renewed "
            f"under that batch's label (or none), not {label!r}"
        )
    return batch

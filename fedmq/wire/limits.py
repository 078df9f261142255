"""Bounds applied to everything decoded from the network, checked before allocation."""

from __future__ import annotations

from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB

DEFAULT_ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts from a peer; every declared size is checked against these.

    The defaults fit models up to ~60M float32 parameters, far beyond what factory edge
    devices train, while keeping a hostile peer from making us allocate gigabytes.
    """

    max_message_bytes: int = 4 * MiB  # one MQTT payload: a 256 KiB chunk with room to spare
    max_header_bytes: int = 1 * MiB  # msgpack header: ~60 B per tensor spec x max_tensors
    max_blob_bytes: int = 256 * MiB  # a reassembled blob, and a decompressed tensor body
    max_decoded_bytes: int = 256 * MiB  # everything decoding one tensor set allocates
    max_tensors: int = 4096
    max_elements_per_tensor: int = 64 * MiB
    max_rank: int = 8
    max_name_length: int = 256
    max_chunks: int = 65_536  # 16 GiB at 256 KiB: the blob size limit binds first
    max_control_bytes: int = 256 * KiB  # JSON round announcements, acks, statuses
    allowed_dtypes: frozenset[str] = field(default=DEFAULT_ALLOWED_DTYPES)


DEFAULT_LIMITS = DecodeLimits()

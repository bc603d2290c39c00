"""Raw storage keys, hashed exactly as FRAME hashes them (for direct storage reads and genesis writes)."""

from __future__ import annotations

import hashlib

import xxhash


def twox128(data: bytes) -> bytes:
    return xxhash.xxh64(data, seed=0).intdigest().to_bytes(8, "little") + xxhash.xxh64(
        data, seed=1
    ).intdigest().to_bytes(8, "little")


def storage_prefix(pallet: str, item: str) -> bytes:
    """The key prefix of a storage item: twox128(pallet) ++ twox128(item)."""
    return twox128(pallet.encode()) + twox128(item.encode())


def blake2_128_concat(key: bytes) -> bytes:
    """Storage-map key hasher Blake2_128Concat."""
    return hashlib.blake2b(key, digest_size=16).digest() + key


def twox64_concat(key: bytes) -> bytes:
    """Storage-map key hasher Twox64Concat."""
    return xxhash.xxh64(key, seed=0).intdigest().to_bytes(8, "little") + key

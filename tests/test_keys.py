"""API keys: shape, entropy source, parsing, and argon2id hashing."""

from __future__ import annotations

from argon2 import PasswordHasher

from proxy.auth.apikeys import KeyHasher, generate_key, parse_key


def test_key_shape_and_parse_round_trip() -> None:
    key = generate_key()
    full = key.full.reveal()
    assert full.startswith("lgk_")
    assert parse_key(full) == (key.key_id, key.secret.reveal())
    assert len(key.secret.reveal()) == 43  # 32 random bytes = 256 bits, base64url
    assert key.secret.reveal() not in repr(key)


def test_keys_are_unique() -> None:
    keys = {generate_key().full.reveal() for _ in range(200)}
    assert len(keys) == 200


def test_parse_rejects_malformed() -> None:
    good = generate_key().full.reveal()
    for bad in ["", "lgk_", good[:-1], good + "x", "sk-" + good[4:], good.upper(), f" {good}"]:
        assert parse_key(bad) is None


def test_hash_is_argon2id_and_verifies_only_the_secret() -> None:
    hasher = KeyHasher()
    key = generate_key()
    stored = hasher.hash(key.secret)
    assert stored.startswith("$argon2id$")
    assert key.secret.reveal() not in stored
    assert hasher.verify(stored, key.secret.reveal())
    assert not hasher.verify(stored, generate_key().secret.reveal())
    assert not hasher.verify("not-a-hash", key.secret.reveal())


def test_needs_rehash_when_parameters_rise() -> None:
    key = generate_key()
    old = PasswordHasher(time_cost=1, memory_cost=4096, parallelism=1).hash(key.secret.reveal())
    hasher = KeyHasher()
    assert hasher.needs_rehash(old)
    assert not hasher.needs_rehash(hasher.hash(key.secret))
    assert hasher.verify(old, key.secret.reveal())

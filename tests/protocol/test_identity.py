"""Tests for potluck.protocol.identity: key files on disk, fingerprints, signatures."""

import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.protocol.identity import (
    Identity,
    IdentityError,
    fingerprint,
    generate_identity,
    load_identity,
    load_or_create_identity,
    public_key_from_hex,
    public_key_to_hex,
    save_identity,
    verify_signature,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")

# RFC 8032 section 7.1, TEST 1: secret key, public key, and the signature of the empty message.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
FINGERPRINT_FORMAT = re.compile(r"pl-[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}")


def _rfc8032_identity() -> Identity:
    return Identity(private_key=Ed25519PrivateKey.from_private_bytes(RFC8032_SEED))


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _pem(key: object, encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


def _assert_one_line_naming(error: IdentityError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message


def test_save_then_load_gives_the_same_key(tmp_path: Path) -> None:
    # Prepare
    identity = generate_identity()
    path = tmp_path / "id.key"
    # Execute
    save_identity(identity, path)
    loaded = load_identity(path)
    # Assert
    assert loaded.public_key == identity.public_key
    assert loaded.fingerprint == identity.fingerprint
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_save_leaves_no_temp_files(tmp_path: Path) -> None:
    save_identity(generate_identity(), tmp_path / "id.key")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.key"]


@posix_only
def test_saved_file_has_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "id.key"

    save_identity(generate_identity(), path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@posix_only
def test_missing_parent_dirs_are_created_with_mode_0700(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "id.key"

    save_identity(generate_identity(), path)

    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700


def test_save_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "id.key"
    first, second = generate_identity(), generate_identity()
    save_identity(first, path)
    # Execute
    with pytest.raises(IdentityError, match="already exists") as error:
        save_identity(second, path)
    # Assert
    _assert_one_line_naming(error.value, path)
    assert load_identity(path).public_key == first.public_key
    save_identity(second, path, overwrite=True)
    assert load_identity(path).public_key == second.public_key


def test_save_without_hard_links_still_refuses_to_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: some filesystems (FAT, some network mounts) have no hard links.
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "id.key"
    identity = generate_identity()
    # Execute
    save_identity(identity, path)
    with pytest.raises(IdentityError, match="already exists"):
        save_identity(generate_identity(), path)
    # Assert
    assert load_identity(path).public_key == identity.public_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.key"]


def test_save_into_a_file_instead_of_a_directory_fails_cleanly(tmp_path: Path) -> None:
    parent = _write(tmp_path / "not-a-dir", b"x")
    path = parent / "id.key"

    with pytest.raises(IdentityError, match="cannot write") as error:
        save_identity(generate_identity(), path)

    _assert_one_line_naming(error.value, path)


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "id.key"

    created_identity, created = load_or_create_identity(path)
    loaded_identity, created_again = load_or_create_identity(path)

    assert created and not created_again
    assert loaded_identity.public_key == created_identity.public_key


@pytest.mark.parametrize("relative_path", ["id.key", "new/dirs/id.key"])
def test_load_or_create_racing_processes_agree_on_one_key(tmp_path: Path, relative_path: str) -> None:
    # Prepare: eight threads stand in for nodes started at the same moment with the same key path.
    path = tmp_path / relative_path
    results: list[tuple[Identity, bool]] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_identity(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Assert
    assert len(results) == 8
    assert len({identity.public_key for identity, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert load_identity(path).public_key == results[0][0].public_key


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nope" / "id.key"


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "id.key"
    path.mkdir()
    return path


def _empty(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", b"")


def _garbage(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", b"hello, I am not a key\n")


def _public_key_pem(tmp_path: Path) -> Path:
    public = Ed25519PrivateKey.generate().public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _write(tmp_path / "id.key", pem)


def _rsa_key(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))


def _ec_key(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", _pem(ec.generate_private_key(ec.SECP256R1())))


def _encrypted(tmp_path: Path) -> Path:
    pem = _pem(Ed25519PrivateKey.generate(), serialization.BestAvailableEncryption(b"hunter2"))
    return _write(tmp_path / "id.key", pem)


def _world_readable(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", _pem(Ed25519PrivateKey.generate()), mode=0o644)


def _group_readable(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", _pem(Ed25519PrivateKey.generate()), mode=0o640)


def _group_writable(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", _pem(Ed25519PrivateKey.generate()), mode=0o620)


def _huge(tmp_path: Path) -> Path:
    return _write(tmp_path / "id.key", b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 100_000)


@pytest.mark.parametrize(
    ("make_key_file", "expected"),
    [
        (_missing, r"does not exist; create one with: potluck keygen --out "),
        (_directory, r"is a directory"),
        (_empty, r"is empty; move it away and run: potluck keygen --out "),
        (_garbage, r"is not a valid potluck key \(expected an Ed25519 PKCS8 PEM private key\)"),
        (_public_key_pem, r"is not a valid potluck key"),
        (_rsa_key, r"holds a key of type RSA, but potluck needs an Ed25519 key"),
        (_ec_key, r"holds a key of type EC, but potluck needs an Ed25519 key"),
        (_encrypted, r"is encrypted"),
        pytest.param(_world_readable, r"is readable by other users \(mode 0644\); run: chmod 600 ", marks=posix_only),
        pytest.param(_group_readable, r"is readable by other users \(mode 0640\); run: chmod 600 ", marks=posix_only),
        pytest.param(
            _group_writable, r"is accessible by other users \(mode 0620\); run: chmod 600 ", marks=posix_only
        ),
        (_huge, r"too large"),
    ],
)
def test_unusable_key_files_give_one_line_errors_naming_the_file(
    tmp_path: Path, make_key_file: Callable[[Path], Path], expected: str
) -> None:
    # Prepare
    path = make_key_file(tmp_path)
    # Execute
    with pytest.raises(IdentityError, match=expected) as error:
        load_identity(path)
    # Assert
    _assert_one_line_naming(error.value, path)


@posix_only
@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_key_file_says_permission_denied(tmp_path: Path) -> None:
    path = _write(tmp_path / "id.key", _pem(Ed25519PrivateKey.generate()), mode=0o000)

    with pytest.raises(IdentityError, match="permission denied") as error:
        load_identity(path)

    _assert_one_line_naming(error.value, path)


@posix_only
def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    os.mkfifo(path, 0o600)

    with pytest.raises(IdentityError, match="is not a regular file") as error:
        load_identity(path)

    _assert_one_line_naming(error.value, path)


def test_load_or_create_does_not_replace_a_broken_key_file(tmp_path: Path) -> None:
    path = _garbage(tmp_path)

    with pytest.raises(IdentityError, match="not a valid potluck key"):
        load_or_create_identity(path)

    assert path.read_bytes() == b"hello, I am not a key\n"


def test_error_messages_stay_one_line_for_paths_with_newlines(tmp_path: Path) -> None:
    path = tmp_path / "evil\nname" / "id.key"

    with pytest.raises(IdentityError) as error:
        load_identity(path)

    assert "\n" not in str(error.value)


def test_signing_matches_rfc8032_test_vector() -> None:
    identity = _rfc8032_identity()

    signature = identity.sign(b"")

    assert identity.public_key == RFC8032_PUBLIC
    assert signature == RFC8032_SIGNATURE
    assert verify_signature(RFC8032_PUBLIC, signature, b"")


def test_fingerprint_known_vectors() -> None:
    # These strings name volunteers in ledgers: if this test fails, the format changed. Change the code back.
    assert fingerprint(RFC8032_PUBLIC) == "pl-eh7d-dx5b-ksrg-cytl"
    assert fingerprint(bytes(range(32))) == "pl-mmg4-2klg-yqzw-neis"
    assert _rfc8032_identity().fingerprint == "pl-eh7d-dx5b-ksrg-cytl"


@settings(max_examples=200)
@given(public_key=st.binary(min_size=32, max_size=32))
def test_fingerprint_is_stable_and_well_formed(public_key: bytes) -> None:
    first = fingerprint(public_key)

    assert fingerprint(bytes(public_key)) == first
    assert FINGERPRINT_FORMAT.fullmatch(first)


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "00" * 32, None])
def test_fingerprint_rejects_non_keys(bad: object) -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        fingerprint(bad)  # type: ignore[arg-type]


def test_identity_repr_shows_only_the_fingerprint() -> None:
    identity = _rfc8032_identity()

    assert repr(identity) == "Identity(pl-eh7d-dx5b-ksrg-cytl)"


def test_verify_signature_rejects_a_changed_message() -> None:
    identity = generate_identity()
    signature = identity.sign(b"round 7")

    assert verify_signature(identity.public_key, signature, b"round 7")
    assert not verify_signature(identity.public_key, signature, b"round 8")
    assert not verify_signature(generate_identity().public_key, signature, b"round 7")


@settings(max_examples=200)
@given(public_key=st.binary(max_size=40), signature=st.binary(max_size=80), data=st.binary(max_size=64))
def test_verify_signature_is_false_on_garbage(public_key: bytes, signature: bytes, data: bytes) -> None:
    assert verify_signature(public_key, signature, data) is False


@pytest.mark.parametrize(
    ("public_key", "signature", "data"),
    [
        ("00" * 32, b"\0" * 64, b""),
        (None, None, None),
        (bytearray(32), bytearray(64), b""),
        (RFC8032_PUBLIC, RFC8032_SIGNATURE, "not bytes"),
    ],
)
def test_verify_signature_is_false_on_wrong_types(public_key: object, signature: object, data: object) -> None:
    assert verify_signature(public_key, signature, data) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "small_order_key",
    [
        bytes([1]) + bytes(31),  # the identity point: verifies (R = identity, S = 0) for every message
        bytes(32),  # a point of order 4
        bytes([1]) + bytes(30) + bytes([0x80]),  # the identity with the x sign bit set
        ((2**255 - 19) + 1).to_bytes(32, "little"),  # the identity, non-canonically encoded (y = p + 1)
    ],
)
def test_verify_signature_refuses_small_order_keys_that_accept_forgeries(small_order_key: bytes) -> None:
    forged = bytes([1]) + bytes(31) + bytes(32)

    assert verify_signature(small_order_key, forged, b"pay me for 10^9 tokens") is False


def test_public_key_hex_round_trip() -> None:
    text = public_key_to_hex(RFC8032_PUBLIC)

    assert text == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert public_key_from_hex(text) == RFC8032_PUBLIC


@pytest.mark.parametrize("bad", ["", "ab" * 31, "ab" * 33, "AB" * 32, "0x" + "ab" * 31, "zz" * 32, b"ab" * 32, None])
def test_public_key_from_hex_rejects_anything_but_64_lowercase_hex(bad: object) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex characters"):
        public_key_from_hex(bad)  # type: ignore[arg-type]

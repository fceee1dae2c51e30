"""A node's Ed25519 identity: create, save, load, sign, verify, and name it by fingerprint.

Every potluck node (peer or aggregator) signs what it sends with one Ed25519 key. All Ed25519
code of the project lives in this module, so there is one place to audit.

On disk a key is an unencrypted PKCS8 PEM private key ("-----BEGIN PRIVATE KEY-----"), the same
file `openssl genpkey -algorithm ed25519` writes, with mode 0600 (owner read/write only). It is
written atomically (temp file in the same directory, fsync, rename, fsync the directory) so a
crash never leaves a half-written key, and loading refuses a file that other users can read.

On the wire a public key is its raw 32 bytes; in configs it is 64 lowercase hex characters; in
logs, the ledger and the status page it is its fingerprint (see `fingerprint`).
"""

import base64
import hashlib
import logging
import os
import secrets
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from potluck.errors import PotluckError

logger = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# A PKCS8 PEM Ed25519 key is 119 bytes; anything far larger is not one of ours, so we stop reading there.
_MAX_KEY_FILE_BYTES = 64 * 1024

# Ed25519 points of small order (the 8-torsion), identified by their y coordinate mod p. A public key on
# one of them verifies forged signatures (OpenSSL accepts R = identity, S = 0 for the identity key on any
# message), so such a key proves nothing and is refused. Reducing mod p also catches non-canonical encodings.
_P = 2**255 - 19
_SMALL_ORDER_Y = frozenset(
    {
        0,
        1,
        _P - 1,
        0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
        0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
    }
)


class IdentityError(PotluckError):
    """A key file cannot be used; the one-line message names the file and the command that fixes it."""


@dataclass(frozen=True, kw_only=True, slots=True, eq=False, repr=False)
class Identity:
    """A node's Ed25519 private key. Compare identities by `public_key`; the repr shows only the fingerprint."""

    private_key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise TypeError(f"Identity needs an Ed25519PrivateKey, got {type(self.private_key).__name__}")

    def __repr__(self) -> str:
        return f"Identity({self.fingerprint})"

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key, as it travels on the wire."""
        return self.private_key.public_key().public_bytes_raw()

    @property
    def fingerprint(self) -> str:
        """The public key's short human-readable name (see `fingerprint`)."""
        return fingerprint(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """Sign `data` (already domain-separated by the caller) and return the 64-byte signature."""
        return self.private_key.sign(data)


def generate_identity() -> Identity:
    """Create a fresh random identity (from the OS's CSPRNG)."""
    return Identity(private_key=Ed25519PrivateKey.generate())


def fingerprint(public_key: bytes) -> str:
    """Name a public key for humans: `pl-` + the first 10 bytes of sha256(key) in base32, grouped by four.

    Example: RFC 8032's first test key (d75a98...511a) is `pl-eh7d-dx5b-ksrg-cytl`. 80 bits tell
    volunteers apart on a status page (a collision takes ~2^40 keys) while staying short enough to
    read aloud. Lowercase RFC 4648 base32 (a-z, 2-7) needs no padding for 10 bytes and has no 0 or 1
    to mistake for o or l. The ledger names peers by this string: the format must never change.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a public key is {PUBLIC_KEY_BYTES} raw bytes, got {public_key!r:.80}")
    text = base64.b32encode(hashlib.sha256(public_key).digest()[:10]).decode("ascii").lower()
    return "pl-" + "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def public_key_to_hex(public_key: bytes) -> str:
    """Render a raw 32-byte public key as the 64 lowercase hex characters configs use."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a public key is {PUBLIC_KEY_BYTES} raw bytes, got {public_key!r:.80}")
    return public_key.hex()


def public_key_from_hex(text: str) -> bytes:
    """Parse a config's public key (exactly 64 lowercase hex characters) into its raw 32 bytes.

    Raises ValueError (which pydantic reports with the field name) rather than guessing at
    uppercase or prefixed forms: the config hash covers the text, so there must be one spelling.
    """
    hex_digits = "0123456789abcdef"
    if not isinstance(text, str) or len(text) != 2 * PUBLIC_KEY_BYTES or any(c not in hex_digits for c in text):
        raise ValueError(
            f"a public key is written as {2 * PUBLIC_KEY_BYTES} lowercase hex characters, got {text!r:.80}"
        )
    return bytes.fromhex(text)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if `signature` is `public_key`'s Ed25519 signature of `data`; False on anything else.

    Never raises: wrong lengths, wrong types, garbage and small-order (forgeable) keys all give False,
    so callers handling hostile input need only one branch.
    """
    if not (isinstance(public_key, bytes) and isinstance(signature, bytes) and isinstance(data, bytes)):
        return False
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    if (int.from_bytes(public_key, "little") & ((1 << 255) - 1)) % _P in _SMALL_ORDER_Y:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _show(path: Path) -> str:
    """The path as one shell-pasteable token: quoted when needed, line breaks escaped to keep messages one line."""
    return shlex.quote(str(path).replace("\r", "\\r").replace("\n", "\\n"))


def _keygen_hint(path: Path) -> str:
    return f"potluck keygen --out {_show(path)}"


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700 (os.makedirs applies its mode to the leaf only)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for new_dir in reversed(missing):
        try:
            new_dir.mkdir(mode=0o700)
        except FileExistsError:  # another process got there first: its directory, its mode
            continue
        os.chmod(new_dir, 0o700)  # mkdir's mode is masked by the umask; make it exactly 0700


def _fsync_dir(directory: Path) -> None:
    """Flush a rename to disk; POSIX only (Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_key_file(path: Path, pem: bytes, *, overwrite: bool) -> None:
    """Write `pem` to `path` atomically with mode 0600; raise FileExistsError if it exists and not `overwrite`."""
    _make_private_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # unlike rename, fails if `path` exists, even when another process races us
            except FileExistsError:
                raise
            except OSError:  # no hard links on this filesystem: check, then rename (a narrow race remains)
                if os.path.lexists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def save_identity(identity: Identity, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write `identity` to `path` as an unencrypted PKCS8 PEM with mode 0600, atomically.

    Missing parent directories are created with mode 0700. An existing file is kept (IdentityError)
    unless `overwrite`: it may be the only copy of a node's identity, and with it its ledger credit.
    """
    path = Path(path)
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _write_new_key_file(path, pem, overwrite=overwrite)
    except FileExistsError:
        raise IdentityError(
            f"key file {_show(path)} already exists; refusing to overwrite it (it may be this node's only identity), "
            "move it away first or pass overwrite=True"
        ) from None
    except OSError as e:
        raise IdentityError(
            f"cannot write key file {_show(path)} ({e.strerror or e}); choose a path in a directory you own"
        ) from e
    logger.info("saved identity %s to %s", identity.fingerprint, path)


def _read_key_file(path: Path) -> bytes:
    """Read a key file's bytes after checking it is a regular file that only its owner can access."""
    try:
        # O_NONBLOCK: opening a FIFO by mistake must not hang; it has no effect on regular files.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise IdentityError(f"key file {_show(path)} does not exist; create one with: {_keygen_hint(path)}") from None
    except IsADirectoryError:
        raise IdentityError(f"key file {_show(path)} is a directory; pass the key file inside it") from None
    except PermissionError:
        raise IdentityError(
            f"key file {_show(path)} is not readable by this user (permission denied); "
            "run potluck as the file's owner, or pass a key file of your own"
        ) from None
    except OSError as e:
        raise IdentityError(f"key file {_show(path)} cannot be opened ({e.strerror or e}); check the path") from e
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IdentityError(f"key file {_show(path)} is a directory; pass the key file inside it")
        if not stat.S_ISREG(mode):
            raise IdentityError(f"key file {_show(path)} is not a regular file; pass the path of a key file")
        if os.name == "posix" and mode & 0o077:
            access = "readable" if mode & 0o044 else "accessible"
            raise IdentityError(
                f"key file {_show(path)} is {access} by other users (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {_show(path)}"
            )
        chunks = []
        size = 0
        while size <= _MAX_KEY_FILE_BYTES:
            chunk = os.read(fd, _MAX_KEY_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise IdentityError(f"key file {_show(path)} cannot be read ({e.strerror or e}); check the path") from e
    finally:
        os.close(fd)
    return b"".join(chunks)


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load the Ed25519 key at `path`, refusing files other users can access (POSIX) and anything not ours.

    Every failure is an IdentityError with a one-line message naming the file and the fix.
    """
    path = Path(path)
    data = _read_key_file(path)
    replace_hint = f"move it away and run: {_keygen_hint(path)}"
    if not data.strip():
        raise IdentityError(f"key file {_show(path)} is empty; {replace_hint}")
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise IdentityError(f"key file {_show(path)} is too large to be a potluck key; {replace_hint}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # what cryptography raises for an encrypted key without a password
        raise IdentityError(
            f"key file {_show(path)} is encrypted, but potluck keys are stored unencrypted with mode 0600; "
            f"decrypt it with: openssl pkey -in {_show(path)} -out NEW.key, or {replace_hint}"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError(
            f"key file {_show(path)} is not a valid potluck key (expected an Ed25519 PKCS8 PEM private key); "
            f"{replace_hint}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        kind = type(key).__name__.removesuffix("PrivateKey") or "unknown"
        raise IdentityError(
            f"key file {_show(path)} holds a key of type {kind}, but potluck needs an Ed25519 key; {replace_hint}"
        )
    return Identity(private_key=key)


def load_or_create_identity(path: str | os.PathLike[str]) -> tuple[Identity, bool]:
    """Load the identity at `path`, or create and save a new one there on first run; the bool says it was created.

    Safe when two processes start at once: only one file is ever written and both end up with its key.
    """
    path = Path(path)
    if not os.path.lexists(path):
        identity = generate_identity()
        try:
            save_identity(identity, path)
            logger.info("created new identity %s at %s", identity.fingerprint, path)
            return identity, True
        except IdentityError:
            if not os.path.lexists(path):  # a real write failure, not a lost race
                raise
    return load_identity(path), False

"""Where the daemon may listen, and CurveZMQ keys.

Without CurveZMQ the daemon binds only loopback endpoints (tcp on 127.0.0.1 / localhost / ::1, ipc,
inproc); any other bind needs CurveZMQ (server secret key + a folder of authorised client public
keys) or an explicit --insecure. Keys are ZeroMQ certificate files written by
`zmq.auth.create_certificates` (`edgeinspect serve keys --out DIR` writes a server pair, client
pairs and an authorized/ folder holding the clients' public keys).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class SecurityError(ValueError):
    pass


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if not rest.startswith("[") else rest[:rest.find("]") + 1]
    if ";" in host:  # "source;destination" form: the bind part is after the ';'
        host = host.split(";", 1)[1]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_bind(endpoint: str, curve: bool, insecure: bool) -> None:
    if not is_loopback(endpoint) and not curve and not insecure:
        raise SecurityError(
            f"refusing to bind {endpoint} without CurveZMQ: it is reachable from other machines. Give "
            "--curve-server-key and --curve-authorized-dir (keys: `edgeinspect serve keys --out DIR`), bind "
            "tcp://127.0.0.1:PORT, or pass --insecure to accept unauthenticated clients from the network")


@dataclass(frozen=True)
class CurveServerKeys:
    public: bytes
    secret: bytes
    authorized_dir: Path


@dataclass(frozen=True)
class CurveClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise SecurityError("this libzmq was built without CurveZMQ support (zmq.has('curve') is False)")


def _load_pair(path: Path, what: str) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{what} {path}: cannot read the key file ({e})") from None
    if secret is None:
        raise SecurityError(f"{what} {path} holds no secret key (give the '.key_secret' file)")
    return public, secret


def load_server_keys(secret_file: str | Path, authorized_dir: str | Path) -> CurveServerKeys:
    _require_curve()
    public, secret = _load_pair(Path(secret_file), "--curve-server-key")
    adir = Path(authorized_dir)
    if not adir.is_dir() or not any(adir.glob("*.key")):
        raise SecurityError(f"--curve-authorized-dir {adir}: no client public keys (*.key) there")
    return CurveServerKeys(public, secret, adir)


def load_client_keys(server_public_file: str | Path, client_secret_file: str | Path) -> CurveClientKeys:
    import zmq.auth

    _require_curve()
    try:
        server_public, _ = zmq.auth.load_certificate(Path(server_public_file))
    except (OSError, ValueError) as e:
        raise SecurityError(f"server public key {server_public_file}: cannot read ({e})") from None
    public, secret = _load_pair(Path(client_secret_file), "client secret key")
    return CurveClientKeys(server_public, public, secret)


def apply_server_curve(sock: zmq.Socket, keys: CurveServerKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def apply_client_curve(sock: zmq.Socket, keys: CurveClientKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def start_authenticator(context: zmq.Context, keys: CurveServerKeys):
    """A ZAP handler thread that admits only clients whose public key is in keys.authorized_dir."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    return auth


def create_keys(out_dir: str | Path, clients: list[str] | tuple[str, ...] = ("client",)) -> dict[str, str]:
    """Write server.key/server.key_secret, <client>.key/<client>.key_secret and authorized/<client>.key
    into `out_dir` (secret files mode 0600); returns the paths by role."""
    import zmq.auth

    _require_curve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "authorized").mkdir(exist_ok=True)
    paths: dict[str, str] = {}
    for name in ("server", *clients):
        if (out / f"{name}.key_secret").exists():
            raise SecurityError(f"{out / (name + '.key_secret')} already exists; not overwriting a key")
        public, secret = zmq.auth.create_certificates(out, name)
        Path(secret).chmod(0o600)
        paths[f"{name}_public"], paths[f"{name}_secret"] = public, secret
        if name != "server":
            shutil.copy(public, out / "authorized" / Path(public).name)
    paths["authorized_dir"] = str(out / "authorized")
    return paths

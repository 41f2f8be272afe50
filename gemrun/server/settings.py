"""What `serve` was told: ports, limits, keys, hosts; and which Host headers it answers (DNS-rebinding defence)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)  # CORS is off unless origins are named
    max_body: int = 32 << 20  # bytes of a request body (images arrive base64 in JSON)
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # requests waiting beyond the batch; past it, 429
    request_timeout: float = 600.0  # seconds a request may run
    max_tokens_default: int | None = None  # when a request sets none: the rest of the context
    shutdown_deadline: float = 10.0  # seconds in-flight requests get on shutdown
    cache_ram: float = 4.0  # GiB of finished sequences' KV caches kept for prefix reuse (0: none)
    served_name: str | None = None
    draft: object = None  # speculative decoding (Gemma 4): a drafter checkpoint path, or a speculative.Speculator
    draft_tokens: int = 4  # tokens drafted per round (with a path)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served besides loopback ones ("*": any)
    header_timeout: float = 20.0  # seconds a client has to send a request's line and headers
    body_timeout: float = 60.0  # seconds a client has to send a request's body


LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback(host: str) -> bool:
    """Whether a host name or address (no port) names this machine's loopback interface."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1", "localhost:8000" -> "localhost")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.split(":", 1)[0] if header.count(":") == 1 else header  # a bare IPv6 address has several


def host_allowed(header: str, settings: Settings) -> bool:
    """DNS rebinding defence, as Ollama's: a server bound to loopback answers only requests addressed to a
    loopback name or address (or a name in --allowed-hosts); a web page that rebinds its own name to 127.0.0.1
    gets 403. A server bound elsewhere restricts Host only when --allowed-hosts names some."""
    allowed = [h.lower() for h in settings.allowed_hosts]
    name = host_name(header)
    if "*" in allowed or is_loopback(name) or name in allowed:
        return True
    return not allowed and not is_loopback(settings.host)

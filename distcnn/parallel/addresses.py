"""This machine's address towards a peer, and torchrun's rendezvous stores bound to that address only."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from contextlib import contextmanager

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolved(host: str, multi_node: bool) -> str | None:
    """`host` as this machine resolves it; None where unknown, or where several machines need a host *name*
    that resolves to loopback here (a hosts file mapping the name to 127.0.1.1): the others know it otherwise."""
    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError, UnicodeError):
        return None
    return None if multi_node and is_loopback(address) and not is_loopback(host) else address


def route_address(host: str, multi_node: bool) -> str | None:
    """This machine's address on the way to `host`, where `host` reaches it (a UDP connect sends nothing);
    None where unknown: torchrun then publishes the host name."""
    address = resolved(host, multi_node)
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            return probe.getsockname()[0]
    except (OSError, TypeError):  # TypeError: no address
        return None


@contextmanager
def own_addresses_only(one_machine: bool):
    """While torchrun runs in this process, nothing it starts listens beyond its own address: the TCPStore
    servers of its rendezvous (the c10d or static store at the endpoint, the shared store MASTER_ADDR names)
    bind their host's address, and the ranks of one machine talk over loopback (GLOO_/NCCL_SOCKET_IFNAME).

    The store is unauthenticated and carries pickled state, yet a TCPStore server ignores its host and binds
    every interface ("::", else "0.0.0.0": UvTcpServer::makeWithPort in torch/csrc/distributed/c10d/
    TCPStoreLibUvBackend.cpp; the legacy backend's listen passes no address either) unless handed a listening
    socket (master_listen_fd), which torchrun never does. Where the address is unknown, torch's choice stands."""
    import psutil
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous, static_tcp_rendezvous

    def store(host_name, port, world_size=None, is_master=False, timeout=None, **options):
        options |= {"timeout": timeout} if timeout is not None else {}
        address = resolved(host_name, not one_machine) if is_master and "master_listen_fd" not in options else None
        if address is None:
            return TCPStore(host_name, port, world_size, is_master, **options)
        try:
            server = socket.create_server((address, port), family=socket.AF_INET6 if ":" in address else
                                          socket.AF_INET)
        except OSError as error:  # a RuntimeError, as TCPStore's: the c10d rendezvous then joins as a client
            raise RuntimeError(f"the rendezvous store cannot listen on {address}:{port}: {error}") from error
        return TCPStore(host_name, server.getsockname()[1], world_size, True, master_listen_fd=server.detach(),
                        **options)

    lo = next((name for name, addresses in psutil.net_if_addrs().items()
               if any(address.address == LOOPBACK for address in addresses)), "lo")
    variables = {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo} if one_machine else {}
    saved_variables = {name: os.environ.get(name) for name in variables}
    replacements = [(c10d_rendezvous_backend, "TCPStore", store), (static_tcp_rendezvous, "TCPStore", store),
                    (dynamic_rendezvous.DynamicRendezvousHandler, "_create_tcp_store_server",
                     lambda _, addr, port: store(addr, port, is_master=True, multi_tenant=True))]
    # a torch without one of these names keeps its own binding there (the sockets test would show it)
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements if hasattr(owner, name)]
    for owner, name, replacement in replacements:
        if hasattr(owner, name):
            setattr(owner, name, replacement)
    os.environ.update(variables)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        for name, value in saved_variables.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def endpoint_holder(host: str, port: int) -> str | None:
    """Who already listens on `host:port` of this machine, where it is not a rendezvous: "pid N (name)".
    None when the port is free, when the address is not this machine's (it cannot be checked from here), when
    the listener is distcnn or torchrun (another machine of the same job, started on this one), or when the
    listener cannot be seen (another user's process, without root): then the rendezvous timeout names it."""
    address = resolved(host, multi_node=False)
    if address is None:
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
        try:
            probe.bind((address, port))
            return None
        except OSError as error:
            if error.errno != errno.EADDRINUSE:  # not an address of this machine, or not ours to bind
                return None
    import psutil

    try:
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
        listeners = [psutil.Process(pid) for pid in sorted(pids)]
        if not listeners or any(is_rendezvous(listener.cmdline()) for listener in listeners):
            return None
        return ", ".join(f"pid {listener.pid} ({listener.name()})" for listener in listeners)
    except (psutil.Error, OSError):
        return None


def is_rendezvous(cmdline: list[str]) -> bool:
    """A process that hosts a torchrun rendezvous store: distcnn (`distcnn ...`, `python -m distcnn...`) or
    torchrun (`torchrun`, `python -m torch.distributed.run`). Read by its arguments, not by where it lives."""
    for word in cmdline:
        name = os.path.basename(word)
        if name in ("distcnn", "torchrun") or word.startswith("distcnn.") or word.startswith("torch.distributed."):
            return True
    return False


def silent_listener(host: str, port: int, seconds: float) -> bool:
    """Whether something at host:port accepts connections but does not answer as a rendezvous store within
    `seconds` (another program on the port, which this machine cannot name: on another machine, or another
    user's; silent, or answering in another protocol, which the client retries until its timeout). A torch
    store client would wait for that answer without end: torch has no timeout there.
    False when nothing listens there yet (torch's rendezvous waits for it, up to its read timeout, and says
    so), or when a store answers. The store client asks in a thread of its own, left behind when it hangs."""
    try:
        socket.create_connection((host, port), timeout=min(seconds, 5.0)).close()
    except OSError:
        return False
    from datetime import timedelta

    from torch.distributed import TCPStore

    def ask() -> None:
        try:
            TCPStore(host, port, is_master=False, timeout=timedelta(seconds=seconds)).check(["distcnn-probe"])
        except Exception:  # noqa: BLE001 — any answer that is no hang: torch's rendezvous says what it is
            pass

    asking = threading.Thread(target=ask, name="distcnn-store-probe", daemon=True)
    asking.start()
    asking.join(seconds)  # (a client still asking then got no store's answer: none, or another program's)
    return asking.is_alive()

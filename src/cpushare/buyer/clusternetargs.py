"""The options of ``cpushare cluster up`` that join its nodes to the buyer's
network, and their checks (shared by `up` and its detached agent)."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..order import split_hostport
from ..vpn.services import DEFAULT_SUBNET, Subnet


@dataclass(frozen=True)
class NetSpec:
    listen: tuple[str, int]  # the UDP address the endpoint binds
    advertise: str  # HOST:PORT the market tells the sellers
    subnet: Subnet
    dhcp: bool
    nfs: Path | None

    def argv(self) -> list[str]:
        """The same options, for the detached agent."""
        host = self.listen[0]
        out = ["--listen", f"[{host}]:{self.listen[1]}" if ":" in host else
               f"{host}:{self.listen[1]}", "--advertise", self.advertise,
               "--subnet", str(self.subnet)]
        if not self.dhcp:
            out.append("--no-dhcp")
        if self.nfs is not None:
            out += ["--nfs", str(self.nfs)]
        return out


def add_net_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the cluster's network (needs root or CAP_NET_ADMIN)")
    g.add_argument("--listen", metavar="ADDR:PORT",
                   help="join the nodes to an encrypted virtual Ethernet whose endpoint is "
                        "this UDP address of this host (the sellers send to it)")
    g.add_argument("--advertise", metavar="HOST:PORT",
                   help="the address the sellers are told to send to (default: --listen; "
                        "give it when this host is behind NAT or --listen is 0.0.0.0)")
    g.add_argument("--subnet", metavar="CIDR",
                   help=f"the cluster's private IPv4 subnet (default {DEFAULT_SUBNET}); this "
                        f"host takes its first address on a TAP device")
    g.add_argument("--no-dhcp", action="store_true",
                   help="start no DHCP server: run your own on the TAP device")
    g.add_argument("--nfs", metavar="DIR", type=Path,
                   help="export DIR to the cluster's subnet over NFSv4 (nfs-ganesha)")


def _hostport(text: str, option: str) -> tuple[str, int]:
    try:
        host, port = split_hostport(text, default_port=0)
    except ValueError as e:
        raise ValueError(f"{option} {text}: {e}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{option} {text}: give a port, HOST:PORT")
    return host, port


def net_spec(args: argparse.Namespace, nodes: int) -> NetSpec | None:
    """The network asked for (None: none); ValueError naming a bad option."""
    if args.listen is None:
        for opt, given in (("--advertise", args.advertise), ("--subnet", args.subnet),
                           ("--no-dhcp", args.no_dhcp), ("--nfs", args.nfs)):
            if given:
                raise ValueError(f"{opt} is an option of the cluster's network: it needs "
                                 f"--listen ADDR:PORT")
        return None
    host, port = _hostport(args.listen, "--listen")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--listen {args.listen}: ADDR is a numeric IP address of this "
                         f"host") from None
    if args.advertise is not None:
        _hostport(args.advertise, "--advertise")
        advertise = args.advertise
    elif addr.is_unspecified:
        raise ValueError(f"--listen {args.listen}: the sellers cannot send to {host}; give "
                         f"the address they reach with --advertise HOST:PORT")
    else:
        advertise = f"[{host}]:{port}" if addr.version == 6 else f"{host}:{port}"
    subnet = Subnet(args.subnet or DEFAULT_SUBNET)
    if nodes + 1 > subnet.size:
        raise ValueError(f"--nodes {nodes}: subnet {subnet} has {subnet.size} addresses for "
                         f"DHCP; give a larger one with --subnet")
    nfs = None
    if args.nfs is not None:
        nfs = args.nfs.absolute()
        if not nfs.is_dir():
            raise ValueError(f"--nfs {args.nfs}: not a directory")
    return NetSpec((host, port), advertise, subnet, not args.no_dhcp, nfs)

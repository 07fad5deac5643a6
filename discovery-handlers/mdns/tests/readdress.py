"""Publishes one DNS-SD service with python zeroconf and moves it to other addresses on request.

A peer for tests/peers.rs (address change). It is not tests/peers/mdns/publish.py because that one
cannot change addresses, and the repository's shared peer scripts are not this crate's to edit.

Usage: readdress.py --name NAME --type _x._tcp.local. --port N --host h.local.
                    --bind IP --addr IP [--addr IP ...]
  --bind  the address whose interface zeroconf uses (only that one: never the machine's networks)
  --addr  the addresses announced in the host's A/AAAA records
stdin commands (one per line):
  addr IP [IP ...]  re-announce the service with these addresses instead (zeroconf's
                    update_service: the new A/AAAA records go out with the cache-flush bit)
  quit              unregister (goodbyes) and exit
Prints "ready" once registered, "updated" after each addr command, "bye" on quit.
"""

import argparse
import ipaddress
import sys

from zeroconf import IPVersion, ServiceInfo, Zeroconf


def info_for(args, addrs):
    return ServiceInfo(
        args.type,
        f"{args.name}.{args.type}",
        port=args.port,
        server=args.host,
        addresses=[ipaddress.ip_address(a).packed for a in addrs],
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--type", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--bind", required=True)
    ap.add_argument("--addr", action="append", required=True)
    args = ap.parse_args()

    zc = Zeroconf(interfaces=[args.bind], ip_version=IPVersion.V4Only)
    info = info_for(args, args.addr)
    zc.register_service(info)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "addr":
            info = info_for(args, words[1:])
            zc.update_service(info)
            print("updated", flush=True)
        elif words[0] == "quit":
            break
    zc.unregister_service(info)
    zc.close()
    print("bye", flush=True)


if __name__ == "__main__":
    main()

"""Publishes one DNS-SD service with python zeroconf, driven by lines on stdin.

Usage: publish.py --name NAME --type _x._tcp.local. --port N --host h.local.
                  --addr IP [--addr IP ...] [--ttl SECONDS] [--txt k=v ...]
stdin commands (one per line):
  txt k=v k2=v2   replace the TXT record (announced at once)
  quit            unregister (sends goodbyes: TTL 0) and exit
Kill it with SIGKILL to leave without goodbyes: the records then expire by TTL.
Prints "ready" once the service is registered.
"""

import argparse
import ipaddress
import sys

from zeroconf import IPVersion, ServiceInfo, Zeroconf


def txt_dict(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        out[key] = value if sep else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--type", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--addr", action="append", required=True)
    ap.add_argument("--ttl", type=int, default=None, help="TTL of every record")
    ap.add_argument("--txt", action="append", default=[])
    args = ap.parse_args()

    addrs = [ipaddress.ip_address(a) for a in args.addr]
    has4 = any(a.version == 4 for a in addrs)
    has6 = any(a.version == 6 for a in addrs)
    version = IPVersion.All if has4 and has6 else (IPVersion.V6Only if has6 else IPVersion.V4Only)
    # Only the given addresses' interfaces: never the machine's other networks.
    zc = Zeroconf(interfaces=[str(a) for a in addrs], ip_version=version)
    ttl = {}
    if args.ttl is not None:
        ttl = {"host_ttl": args.ttl, "other_ttl": args.ttl}
    info = ServiceInfo(
        args.type,
        f"{args.name}.{args.type}",
        port=args.port,
        server=args.host,
        addresses=[a.packed for a in addrs],
        properties=txt_dict(args.txt),
        **ttl,
    )
    zc.register_service(info, ttl=args.ttl)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "txt":
            info = ServiceInfo(
                args.type,
                f"{args.name}.{args.type}",
                port=args.port,
                server=args.host,
                addresses=[a.packed for a in addrs],
                properties=txt_dict(words[1:]),
                **ttl,
            )
            zc.update_service(info)
            print("updated", flush=True)
        elif words[0] == "quit":
            break
    zc.unregister_service(info)
    zc.close()
    print("bye", flush=True)


if __name__ == "__main__":
    main()

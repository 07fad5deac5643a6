"""A WSDiscovery (PyPI) publisher: one target with the given types, scopes and XAddrs, until SIGTERM.

Used for the IPv6 probe path and for odd-but-legal replies (several XAddrs with a host name
first, only tds:Device, many scopes).
"""
import argparse
import ipaddress
import signal
import socket
import time

from wsdiscovery import QName, Scope
from wsdiscovery import threaded
from wsdiscovery.publishing import ThreadedWSPublishing

# WSDiscovery 2.x queues every unicast reply on both its IPv4 and its IPv6 thread; the thread of the
# other family then raises gaierror and dies, and with it every later reply of that family. A
# prober asking over IPv4 and IPv6 (as Verge's handler does) thus silenced the publisher after its
# first round, or before its first reply, depending on timing. Keep each reply on its own family.
_add_unicast = threaded.NetworkingThread.addUnicastMessage


def _add_unicast_same_family(self, env, addr, port, *rest, **kw):
    try:
        v6 = ipaddress.ip_address(addr).version == 6
    except ValueError:
        v6 = None
    if v6 is not None and v6 != (self._get_inet() == socket.AF_INET6):
        return
    _add_unicast(self, env, addr, port, *rest, **kw)


threaded.NetworkingThread.addUnicastMessage = _add_unicast_same_family

NS = {
    "dn": "http://www.onvif.org/ver10/network/wsdl",
    "tds": "http://www.onvif.org/ver10/device/wsdl",
}

p = argparse.ArgumentParser()
p.add_argument("--uuid", required=True, help="endpoint, e.g. urn:uuid:...")
p.add_argument("--type", action="append", default=[], help="dn:NetworkVideoTransmitter or tds:Device")
p.add_argument("--scope", action="append", default=[])
p.add_argument("--xaddr", action="append", default=[])
args = p.parse_args()

types = []
for t in args.type or ["dn:NetworkVideoTransmitter"]:
    prefix, local = t.split(":", 1)
    types.append(QName(NS[prefix], local, prefix))
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
wsd = ThreadedWSPublishing(uuid_=args.uuid)
wsd.start()
wsd.publishService(types=types, scopes=[Scope(s) for s in args.scope], xAddrs=args.xaddr)
print("READY", flush=True)
while not stop:
    time.sleep(0.1)
wsd.stop()

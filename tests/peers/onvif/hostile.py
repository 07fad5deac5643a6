"""A hostile WS-Discovery + HTTP responder, for robustness tests.

UDP 3702 (multicast group joined on --ip): every Probe is answered with garbage, a huge
datagram, truncated XML, a deeply nested document and finally valid ProbeMatches for several
endpoints whose XAddrs point at the HTTP side, where each path misbehaves differently:
/garbage (not XML), /huge (64 MiB body), /truncated (cut mid-document), /slow (one byte per
second), /flood (an endless chunked body).
"""
import argparse
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--ip", required=True)
p.add_argument("--http-port", type=int, default=8090)
args = p.parse_args()

MODES = ["garbage", "huge", "truncated", "slow", "flood"]


def match(uuid, xaddr):
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        'xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
        'xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery"><s:Header>'
        '<a:Action>http://schemas.xmlsoap.org/ws/2005/04/discovery/ProbeMatches</a:Action>'
        '</s:Header><s:Body><d:ProbeMatches><d:ProbeMatch><a:EndpointReference><a:Address>'
        f'{uuid}</a:Address></a:EndpointReference><d:Types>dn:NetworkVideoTransmitter</d:Types>'
        f'<d:XAddrs>{xaddr}</d:XAddrs></d:ProbeMatch></d:ProbeMatches></s:Body></s:Envelope>'
    )


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 3702))
    mreq = struct.pack("4s4s", socket.inet_aton("239.255.255.250"), socket.inet_aton(args.ip))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    while True:
        data, addr = s.recvfrom(65535)
        if b"Probe" not in data or b"ProbeMatch" in data:
            continue
        replies = [
            b"\x00\xff garbage \xfe",
            b"<" * 65000,
            match("urn:uuid:deadbeef-0000-0000-0000-000000000000", "http://x")[:150].encode(),
            ("<a>" * 20000).encode()[:65000],
            b"<Envelope><Body><ProbeMatch><EndpointReference><Address>" + b"x" * 60000 + b"</Address></EndpointReference></ProbeMatch></Body></Envelope>",
        ]
        for i, mode in enumerate(MODES):
            xaddr = f"http://{args.ip}:{args.http_port}/{mode}"
            replies.append(match(f"urn:uuid:bad0000{i}-0000-0000-0000-000000000000", xaddr).encode())
        for r in replies:
            try:
                s.sendto(r, addr)
            except OSError:
                pass


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0") or 0)
        self.rfile.read(n)
        mode = self.path.strip("/")
        try:
            if mode == "garbage":
                body = b"\x00\x01 this is not xml <<<"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif mode == "huge":
                self.send_response(200)
                self.send_header("Content-Length", str(64 * 1024 * 1024))
                self.end_headers()
                chunk = b"<a>" * 21845
                for _ in range(1024):
                    self.wfile.write(chunk)
            elif mode == "truncated":
                body = b'<?xml version="1.0"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><tds:GetSystemDateAndTimeResponse'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + 500))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            elif mode == "slow":
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(100000):
                    self.wfile.write(b"<")
                    self.wfile.flush()
                    time.sleep(1)
            elif mode == "flood":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"<a>" * 10000
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass


threading.Thread(target=udp, daemon=True).start()
server = ThreadingHTTPServer((args.ip, args.http_port), H)
server.daemon_threads = True
print("READY", flush=True)
server.serve_forever()

"""A small ONVIF device-service responder: canned SOAP replies behind CherryPy's HTTP digest auth.

Written for Verge's tests because no independent ONVIF device simulator on PyPI serves
GetNetworkInterfaces or Media2 (ipycam, the independent one, has neither, nor HTTP digest).
So what it proves about those operations is only that Verge handles *these* replies, which
follow the ONVIF WSDLs but are ours: it is an odd peer, not an independent implementation.
The HTTP digest side is independent: CherryPy's `auth_digest` tool (RFC 2617/7616, qop=auth,
stateless nonces) checks every request, so Verge's digest client meets a server it did not write.

Replies are the files in replies/ with {{placeholders}} filled in; the SOAP action (from the
Content-Type's action parameter, else the SOAPAction header) and the path choose the file.
Every stream URI carries `user:pass@` when --stream-userinfo is given, as many cameras do.
WS-Discovery is left to the WSDiscovery publisher (tests/peers/onvif/publisher.py).
"""
import argparse
import datetime
import os
import re
import signal
import sys

import cherrypy
from cherrypy.lib import auth_digest

p = argparse.ArgumentParser()
p.add_argument("--ip", required=True)
p.add_argument("--port", type=int, default=8081)
p.add_argument("--rtsp-port", type=int, default=8554)
p.add_argument("--mac", required=True)
p.add_argument("--username", required=True)
p.add_argument("--password", required=True)
p.add_argument("--stream-userinfo", default="", help="e.g. admin:secret (no @)")
args = p.parse_args()

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replies")
REPLIES = {}
for name in os.listdir(HERE):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        REPLIES[name[: -len(".xml")]] = f.read()

# (service path, operation) -> reply file; Media1 and Media2 share operation names.
ROUTES = {
    ("device_service", "GetSystemDateAndTime"): "GetSystemDateAndTime",
    ("device_service", "GetDeviceInformation"): "GetDeviceInformation",
    ("device_service", "GetNetworkInterfaces"): "GetNetworkInterfaces",
    ("device_service", "GetServices"): "GetServices",
    ("media_service", "GetProfiles"): "GetProfiles.media1",
    ("media_service", "GetStreamUri"): "GetStreamUri.media1",
    ("media2_service", "GetProfiles"): "GetProfiles.media2",
    ("media2_service", "GetStreamUri"): "GetStreamUri.media2",
}

FAULT = """<?xml version="1.0" encoding="UTF-8"?>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><s:Fault>
<s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>ter:ActionNotSupported</s:Value></s:Subcode></s:Code>
<s:Reason><s:Text xml:lang="en">not supported here</s:Text></s:Reason></s:Fault></s:Body></s:Envelope>"""


def action_of(headers):
    m = re.search(r'action="([^"]+)"', headers.get("Content-Type", ""))
    action = m.group(1) if m else headers.get("SOAPAction", "").strip('"')
    return action.rsplit("/", 1)[-1]


def fill(text, token=""):
    now = datetime.datetime.now(datetime.timezone.utc)
    values = {
        "host": f"{args.ip}:{args.port}",
        "rtsp_host": f"{args.ip}:{args.rtsp_port}",
        "ip": args.ip,
        "mac": args.mac,
        "userinfo": f"{args.stream_userinfo}@" if args.stream_userinfo else "",
        "token": token,
        "year": now.year, "month": now.month, "day": now.day,
        "hour": now.hour, "minute": now.minute, "second": now.second,
    }
    for k, v in values.items():
        text = text.replace("{{%s}}" % k, str(v))
    return text


class Onvif:
    @cherrypy.expose
    def default(self, service, *_rest, **_kw):
        # request.process_request_body is off: the raw SOAP body is read here.
        body = cherrypy.request.rfile.read().decode("utf-8", "replace")
        op = action_of(cherrypy.request.headers)
        name = ROUTES.get((service, op))
        cherrypy.response.headers["Content-Type"] = "application/soap+xml; charset=utf-8"
        if name is None:
            cherrypy.response.status = 500
            return FAULT.encode()
        m = re.search(r"<[^>]*ProfileToken>([^<]*)<", body)
        print(f"served {service} {op}", flush=True)
        return fill(REPLIES[name], m.group(1) if m else "").encode()


cherrypy.config.update({
    "server.socket_host": args.ip,
    "server.socket_port": args.port,
    "engine.autoreload.on": False,
    "checker.on": False,
    "log.screen": False,
    "environment": "embedded",
})
conf = {
    "/": {
        "tools.auth_digest.on": True,
        "tools.auth_digest.realm": "verge-soap-responder",
        "tools.auth_digest.get_ha1": auth_digest.get_ha1_dict_plain({args.username: args.password}),
        "tools.auth_digest.key": os.urandom(16).hex(),
        "tools.auth_digest.accept_charset": "UTF-8",
        "request.process_request_body": False,
    }
}
cherrypy.tree.mount(Onvif(), "/onvif", conf)


def on_term(*_):
    cherrypy.engine.exit()
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
cherrypy.engine.start()
print("READY", flush=True)
cherrypy.engine.block()

#!/usr/bin/env python3
"""An external Verge/Akri discovery handler in Python, speaking protocol v0 (grpcio).

Handler name `inventory`: each non-empty, non-comment line of a text file is one device
(e.g. the cameras a site lists by address), re-read when the file changes.
discoveryDetails (JSON, which is also YAML): {"inventoryFile": "/etc/site/cameras.txt"}
"""
import json, os, signal, subprocess, sys, tempfile, threading, time
from concurrent import futures

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = os.environ.get("HANDLER_NAME", "inventory")
DIRECTORY = os.environ.get("DISCOVERY_HANDLERS_DIRECTORY", "/var/lib/akri")
REGISTRATION = os.path.join(DIRECTORY, "agent-registration.sock")
SOCKET = os.path.join(DIRECTORY, NAME + ".sock")


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} {NAME}: {msg}", file=sys.stderr, flush=True)


def load_stubs():
    """Generates the v0 stubs from discovery.proto into a temporary directory."""
    out = tempfile.mkdtemp(prefix="verge-v0-stubs-")
    args = ["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}", "discovery.proto"]
    if protoc.main(args) != 0:
        sys.exit("cannot generate stubs from discovery.proto")
    sys.path.insert(0, out)
    import discovery_pb2, discovery_pb2_grpc
    return discovery_pb2, discovery_pb2_grpc


pb, rpc = load_stubs()


def read_inventory(path):
    """The full device list; a device id must be stable and unique: here the line itself."""
    try:
        with open(path) as f:
            lines = [l.strip() for l in f]
    except OSError as e:
        diag = pb.Diagnostic(subject=path, severity="Warning", message=f"cannot read: {e.strerror}")
        return pb.DiscoverResponse(diagnostics=[diag])
    ids = sorted({l for l in lines if l and not l.startswith("#")})
    devices = [pb.Device(id=i, properties={"INVENTORY_ADDRESS": i}) for i in ids]
    return pb.DiscoverResponse(devices=devices)


class Handler(rpc.DiscoveryHandlerServicer):
    def Discover(self, request, context):
        try:
            path = json.loads(request.discovery_details or "{}")["inventoryFile"]
            assert isinstance(path, str) and os.path.isabs(path)
        except (ValueError, KeyError, TypeError, AssertionError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          'discoveryDetails must be JSON {"inventoryFile": "<absolute path>"}')
        last = None
        while context.is_active():  # the agent dropping the stream ends this loop
            current = read_inventory(path)
            if current != last:
                yield current  # always the full current list
                last = current
            time.sleep(0.2)


AUTHORITY = [("grpc.default_authority", "localhost")]


def register():
    """Registers with the agent; retries with capped backoff until it answers."""
    delay = 0.05
    while True:
        try:
            # A socket path is not a valid HTTP/2 :authority; tonic/hyper peers reset such
            # streams, so name the authority explicitly.
            with grpc.insecure_channel("unix://" + REGISTRATION, options=AUTHORITY) as channel:
                rpc.RegistrationStub(channel).RegisterDiscoveryHandler(
                    pb.RegisterDiscoveryHandlerRequest(
                        name=NAME, endpoint=SOCKET, shared=True,
                        endpoint_type=pb.RegisterDiscoveryHandlerRequest.UDS),
                    timeout=2)
            log(f"registered at {SOCKET}")
            return
        except grpc.RpcError as e:
            log(f"registration failed ({e.code().name}: {e.details()}), retrying in {delay:.2f}s")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def socket_id():
    try:
        st = os.stat(REGISTRATION)
        return (st.st_ino, st.st_ctime_ns)
    except OSError:
        return None


def keep_registered():
    """A restarted agent replaces its registration socket: register again right away."""
    while True:
        seen = socket_id()
        register()
        while socket_id() in (seen, None):
            time.sleep(0.1)
        log("agent registration socket replaced")


def main():
    if os.path.exists(SOCKET):
        os.unlink(SOCKET)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    rpc.add_DiscoveryHandlerServicer_to_server(Handler(), server)
    server.add_insecure_port("unix://" + SOCKET)
    server.start()
    log(f"serving Discover at {SOCKET}")
    threading.Thread(target=keep_registered, daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    if os.path.exists(SOCKET):
        os.unlink(SOCKET)


if __name__ == "__main__":
    main()

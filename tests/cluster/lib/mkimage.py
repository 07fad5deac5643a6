#!/usr/bin/env python3
"""Write a single-layer OCI image tarball for one binary, without Docker.

The layer holds the binary, the shared libraries it links (as `ldd` reports
them), CA certificates, a minimal /etc (passwd with a `nonroot` user 65532,
group, nsswitch.conf) and /tmp. Everything is written deterministically (sorted
entries, zero mtimes, root ownership) so the same binary gives the same image
digest and re-importing an unchanged image is a no-op for containerd.

The tarball is an OCI image layout (oci-layout, index.json, blobs/sha256/...)
that `ctr images import` accepts; the image name is carried by the
`io.containerd.image.name` annotation.
"""

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def linked_libraries(binary):
    """Absolute paths of the shared objects `binary` needs, loader included."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    if "not a dynamic executable" in out or "statically linked" in out:
        return []
    if proc.returncode != 0:
        sys.exit(f"mkimage: ldd {binary} failed: {out.strip()}")
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip()
            if target.startswith("not found"):
                sys.exit(f"mkimage: {binary}: missing library: {line}")
            path = target.split(" (", 1)[0].strip()
        else:
            path = line.split(" (", 1)[0].strip()
        if path.startswith("/"):
            libs.append(path)
    return sorted(set(libs))


class Layer:
    """Collects files and directories, then writes them as one sorted tar."""

    def __init__(self):
        self.entries = {}

    def add_dir(self, path, mode=0o755):
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self.entries:
                self.entries[sub] = ("dir", None, mode if i == len(parts) else 0o755)

    def add_bytes(self, path, data, mode=0o644):
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = ("file", data, mode)

    def add_file(self, dest, src, mode=None):
        with open(src, "rb") as f:
            data = f.read()
        if mode is None:
            mode = os.stat(src).st_mode & 0o777
        self.add_bytes(dest, data, mode)

    def add_symlink(self, path, target):
        path = path.strip("/")
        self.add_dir(os.path.dirname(path))
        self.entries[path] = ("symlink", target, 0o777)

    def tar_bytes(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, data, mode = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = mode
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = data
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--binary", required=True, help="the executable to package")
    ap.add_argument("--ref", required=True, help="image name, e.g. localhost/verge/agent:dev")
    ap.add_argument("--out", required=True, help="output tarball")
    ap.add_argument("--user", default="65532", help="default user (uid) of the image")
    ap.add_argument("--dest", help="path of the binary in the image (default /usr/local/bin/NAME)")
    ap.add_argument("--no-libs", action="store_true", help="do not add the libraries ldd reports")
    ap.add_argument("--arg", action="append", default=[], help="default Cmd argument (repeatable)")
    ap.add_argument("--extra", action="append", default=[], metavar="SRC[:DEST]",
                    help="another file (with the libraries it links) in the image (repeatable)")
    ap.add_argument("--busybox", metavar="PATH",
                    help="a static busybox, installed as /bin/busybox with a symlink per applet")
    args = ap.parse_args()

    name = os.path.basename(args.binary)
    dest = args.dest or f"/usr/local/bin/{name}"

    layer = Layer()
    layer.add_file(dest, args.binary, 0o755)
    if not args.no_libs:
        for lib in linked_libraries(args.binary):
            layer.add_file(lib, os.path.realpath(lib), 0o755)
    for extra in args.extra:
        src, _, extra_dest = extra.partition(":")
        layer.add_file(extra_dest or f"/usr/local/bin/{os.path.basename(src)}", src)
        for lib in linked_libraries(src):
            layer.add_file(lib, os.path.realpath(lib), 0o755)
    if args.busybox:
        layer.add_file("/bin/busybox", args.busybox, 0o755)
        for lib in linked_libraries(args.busybox):
            layer.add_file(lib, os.path.realpath(lib), 0o755)
        applets = subprocess.run([args.busybox, "--list"], capture_output=True, text=True, check=True)
        for applet in applets.stdout.split():
            if applet != "busybox" and f"bin/{applet}" not in layer.entries:
                layer.add_symlink(f"/bin/{applet}", "busybox")
    if os.path.exists(CA_BUNDLE):
        layer.add_file(CA_BUNDLE, CA_BUNDLE, 0o644)
    layer.add_bytes(
        "etc/passwd",
        b"root:x:0:0:root:/root:/sbin/nologin\n"
        b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    layer.add_bytes("etc/group", b"root:x:0:\nnonroot:x:65532:\n")
    layer.add_bytes("etc/nsswitch.conf", b"hosts: files dns\n")
    layer.add_dir("tmp", 0o1777)
    layer.add_dir("home/nonroot", 0o755)
    layer.add_dir("root", 0o700)

    layer_tar = layer.tar_bytes()
    layer_digest = sha256(layer_tar)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [dest],
            "Cmd": args.arg or None,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "User": args.user,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "tests/cluster/lib/mkimage.py", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    }
    if config["config"]["Cmd"] is None:
        del config["config"]["Cmd"]
    config_json = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config_json),
            "size": len(config_json),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer_tar),
            }
        ],
    }
    manifest_json = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(manifest_json),
                "size": len(manifest_json),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": args.ref,
                    "org.opencontainers.image.ref.name": args.ref.rsplit(":", 1)[-1],
                },
            }
        ],
    }

    outer = Layer()
    outer.add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    outer.add_bytes("index.json", json.dumps(index, sort_keys=True).encode())
    for blob in (layer_tar, config_json, manifest_json):
        outer.add_bytes("blobs/sha256/" + sha256(blob).split(":", 1)[1], blob)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(outer.tar_bytes())
    os.replace(tmp, args.out)
    print(f"{args.ref} {sha256(manifest_json)} {len(layer_tar)} bytes")


if __name__ == "__main__":
    main()

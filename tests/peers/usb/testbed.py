#!/usr/bin/python3
"""Drives a umockdev testbed for hotplug tests. Run under `umockdev-wrapper`.

Usage: testbed.py CONTROL_SOCKET
Prints the testbed root (for UMOCKDEV_DIR) on stdout, then serves one command per
connection on CONTROL_SOCKET and answers "ok" or "error: ...":
  add FILE.umockdev    add every device of the file and send its "add" uevents (parents first)
  remove DEVPATH       send "remove" uevents for DEVPATH and everything below it (children
                       first) and remove them from the testbed
  quit                 stop
"""
import os
import socket
import sys

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402


def devpaths(text):
    return [l[3:].strip() for l in text.splitlines() if l.startswith("P: ")]


def main():
    control = sys.argv[1]
    testbed = UMockdev.Testbed.new()
    added = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(control)
    server.listen(4)
    print(testbed.get_root_dir(), flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            line = conn.makefile("r").readline().strip()
            cmd, _, arg = line.partition(" ")
            try:
                if cmd == "add":
                    with open(arg) as f:
                        text = f.read()
                    paths = devpaths(text)
                    # add_from_string creates the devices without uevents; send them
                    # afterwards, parents first, as the kernel does.
                    if not testbed.add_from_string(text):
                        raise RuntimeError("add_from_string failed")
                    for p in sorted(paths, key=len):
                        testbed.uevent("/sys" + p, "add")
                        added.append(p)
                elif cmd == "remove":
                    below = [p for p in added if p == arg or p.startswith(arg + "/")]
                    if not below:
                        raise RuntimeError("no such device " + arg)
                    for p in sorted(below, key=len, reverse=True):
                        testbed.uevent("/sys" + p, "remove")
                        testbed.remove_device("/sys" + p)
                        added.remove(p)
                elif cmd == "quit":
                    conn.sendall(b"ok\n")
                    break
                else:
                    raise RuntimeError("unknown command " + cmd)
                conn.sendall(b"ok\n")
            except Exception as e:  # the test reads the reason
                conn.sendall(("error: %s\n" % e).encode())
    server.close()
    os.unlink(control)


if __name__ == "__main__":
    main()

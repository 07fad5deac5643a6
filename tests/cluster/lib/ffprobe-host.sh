#!/bin/sh
# ffprobe for the tool-broker image: runs the node's own ffprobe (Debian's links ~215 shared
# libraries, ~250 MB, too much to copy into a test image) from the node's /usr, which the broker
# pod mounts read-only at /host/usr (hostPath /usr). Test brokers only.
lib=/host/usr/lib/x86_64-linux-gnu
if [ ! -x /host/usr/bin/ffprobe ]; then
	echo "ffprobe: mount the node's /usr at /host/usr (hostPath, readOnly) to use it" >&2
	exit 127
fi
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" /host/usr/bin/ffprobe "$@"

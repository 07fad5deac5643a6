#!/bin/sh
# ffprobe for the tool-broker image: runs the node's own ffprobe (Debian's links ~215 shared
# libraries, ~250 MB, too much to copy into a test image) from the node's /usr, which the broker
# pod mounts read-only at /host/usr (hostPath /usr). Test brokers only.
lib=/host/usr/lib/x86_64-linux-gnu
if [ ! -x /host/usr/bin/ffprobe ]; then
	echo "ffprobe: mount the node's /usr at /host/usr (hostPath, readOnly) to use it" >&2
	exit 127
fi
# Debian puts a few of its libraries in subdirectories (and reaches blas/lapack through
# /etc/alternatives symlinks, which are not mounted): search those directly.
path="$lib:$lib/pulseaudio:$lib/blas:$lib/lapack"
exec "$lib/ld-linux-x86-64.so.2" --library-path "$path" /host/usr/bin/ffprobe "$@"

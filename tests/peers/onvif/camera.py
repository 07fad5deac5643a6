"""Runs one ipycam virtual ONVIF camera with a fixed identity until SIGTERM.

ipycam draws a fresh endpoint UUID at every start; real cameras keep theirs, so
this runner pins it (a camera that restarts on a new address keeps its identity).
Frames are a small synthetic pattern so the RTSP stream is cheap to encode.
"""
import argparse
import logging
import os
import signal
import sys
import tempfile
import time

import numpy as np

from ipycam import CameraConfig, IPCamera

p = argparse.ArgumentParser()
p.add_argument("--ip", required=True)
p.add_argument("--uuid", required=True, help="endpoint address, e.g. urn:uuid:...")
p.add_argument("--name", default="VergeCam")
p.add_argument("--manufacturer", default="PythonCam")
p.add_argument("--model", default="VirtualCam-1")
p.add_argument("--serial", default="PY-000001")
p.add_argument("--username", default="")
p.add_argument("--password", default="")
p.add_argument("--onvif-port", type=int, default=8080)
p.add_argument("--rtsp-port", type=int, default=8554)
p.add_argument("--fps", type=int, default=5)
args = p.parse_args()

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
work = tempfile.mkdtemp(prefix="vg-onvif-cam-")
os.chdir(work)
config = CameraConfig(
    name=args.name,
    manufacturer=args.manufacturer,
    model=args.model,
    serial_number=args.serial,
    local_ip=args.ip,
    onvif_port=args.onvif_port,
    rtsp_port=args.rtsp_port,
    username=args.username,
    password=args.password,
    main_width=320, main_height=240, main_fps=args.fps, main_bitrate="256K",
    sub_width=160, sub_height=120, sub_fps=args.fps, sub_bitrate="128K",
    hw_accel="cpu",
    show_timestamp=False,
    recording_path=os.path.join(work, "recordings"),
)
config._config_path = os.path.join(work, "camera_config.json")
config.source_type = "generated"
camera = IPCamera(config)
camera.onvif.device_uuid = args.uuid

stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
if not camera.start():
    print("camera failed to start", file=sys.stderr)
    sys.exit(1)
print("READY", flush=True)
frame = np.zeros((240, 320, 3), dtype=np.uint8)
n = 0
while not stop:
    frame[:] = (n * 7 % 255, 80, 160)
    camera.stream(frame)
    n += 1
    time.sleep(1.0 / args.fps)
camera.stop()

"""ipycam (through tests/peers/onvif/camera.py, unchanged) answering GetStreamUri with
`rtsp://user:pass@host/...`, as many real cameras do.

ipycam builds its stream URIs from CameraConfig.main_stream_rtsp / sub_stream_rtsp and has no
setting for userinfo in them, so this runner wraps those two properties and then runs the usual
camera runner. Everything else (SOAP, WS-Security, WS-Discovery, RTSP) stays ipycam's.
Usage: camera_userinfo.py --stream-userinfo USER:PASS <camera.py arguments...>
"""
import os
import runpy
import sys

from ipycam import CameraConfig

argv = sys.argv[1:]
i = argv.index("--stream-userinfo")
userinfo = argv[i + 1]
del argv[i : i + 2]


def with_userinfo(prop):
    return property(lambda self: prop.fget(self).replace("rtsp://", f"rtsp://{userinfo}@", 1))


CameraConfig.main_stream_rtsp = with_userinfo(CameraConfig.main_stream_rtsp)
CameraConfig.sub_stream_rtsp = with_userinfo(CameraConfig.sub_stream_rtsp)

here = os.path.dirname(os.path.abspath(__file__))
runner = os.path.normpath(os.path.join(here, "../../../../tests/peers/onvif/camera.py"))
sys.argv = [runner] + argv
runpy.run_path(runner, run_name="__main__")

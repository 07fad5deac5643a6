"""A pymodbus server (TCP or RTU) with per-unit registers and identification objects.

Usage: server.py '<json spec>'
  {"tcp": "127.0.0.1:15020"}  or  {"rtu": "/dev/pts/7", "baud": 19200, "parity": "E", "stopbits": 1}
  "missing": "silent" | "gateway"   unknown unit ids: no answer, or exception 0x0B (default gateway)
  "units": {"1": {"identity": {"0": "ACME", "1": "P-1", "2": "1.0", "5": "M1"} or null,
                  "hr": {"0": [1, 2]}, "ir": {"10": [7]}, "co": {"0": [1, 0]}, "di": {}}}
A unit whose identity is null answers Read Device Identification with IllegalFunction (0x01).

pymodbus answers identification from one server-wide object for every unit id, even
unknown ones; the patches below make it per unit, as a real gateway or RS-485 line is.
"""

import asyncio
import json
import sys

from pymodbus.constants import DeviceInformation, ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import mei_message
from pymodbus.pdu.exceptionresponse import ExceptionResponse
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator import simcore

SPEC = json.loads(sys.argv[1])
UNITS = {int(k): v for k, v in SPEC.get("units", {}).items()}


def _get_device(self, device_id):
    if device_id in self.devices:
        return self.devices[device_id]
    raise NoSuchIdException(f"no unit {device_id}")


simcore.SimCore._SimCore__get_device = _get_device


async def _identification(self, context, device_id):
    if device_id not in UNITS:
        raise NoSuchIdException(f"no unit {device_id}")
    identity = UNITS[device_id].get("identity")
    if identity is None:
        return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)
    objects = {int(k): v.encode() for k, v in identity.items()}
    code, start = self.read_code, self.object_id
    if code == DeviceInformation.SPECIFIC:
        if start not in objects:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
        wanted = [start]
    else:
        top = {DeviceInformation.BASIC: 0x03, DeviceInformation.REGULAR: 0x07}.get(code, 0x100)
        wanted = [i for i in sorted(objects) if start <= i < top]
    return mei_message.ReadDeviceInformationResponse(
        read_code=code,
        information={i: objects[i] for i in wanted},
        dev_id=device_id,
        transaction_id=self.transaction_id,
    )


mei_message.ReadDeviceInformationRequest.datastore_update = _identification


def block(spec, bits):
    data = []
    for addr, values in sorted(spec.items(), key=lambda kv: int(kv[0])):
        if bits:
            values = [bool(v) for v in values]
        data.append(
            SimData(
                address=int(addr),
                values=values,
                datatype=DataType.BITS if bits else DataType.REGISTERS,
            )
        )
    return data


def devices():
    result = []
    for unit, spec in UNITS.items():
        co = block(spec.get("co", {}), True)
        di = block(spec.get("di", {}), True)
        hr = block(spec.get("hr", {}), False)
        ir = block(spec.get("ir", {}), False)
        # Every block needs at least one entry; an unused high address is harmless.
        co = co or [SimData(address=60000, values=[False], datatype=DataType.BITS)]
        di = di or [SimData(address=60000, values=[False], datatype=DataType.BITS)]
        hr = hr or [SimData(address=60000, values=[0], datatype=DataType.REGISTERS)]
        ir = ir or [SimData(address=60000, values=[0], datatype=DataType.REGISTERS)]
        result.append(SimDevice(id=unit, simdata=(co, di, hr, ir)))
    return result


async def main():
    silent = SPEC.get("missing", "gateway") == "silent"
    if "tcp" in SPEC:
        host, port = SPEC["tcp"].rsplit(":", 1)
        server = ModbusTcpServer(
            devices(), address=(host, int(port)), ignore_missing_devices=silent
        )
    else:
        server = ModbusSerialServer(
            devices(),
            port=SPEC["rtu"],
            baudrate=SPEC.get("baud", 19200),
            parity=SPEC.get("parity", "E"),
            stopbits=SPEC.get("stopbits", 1),
            ignore_missing_devices=silent,
        )
    print("serving", flush=True)
    await server.serve_forever()


asyncio.run(main())

"""An asyncua OPC UA server holding the documented address space (plc.opcua.populate_server).

usage: opcua_server.py PORT [CAMERA_SLOTS] [SETTINGS_JSON] ; prints READY; runs until SIGTERM.
SETTINGS_JSON: extra OpcUaSettings fields shaping the address space (e.g. ring mode).
Stdin lines "get NODEID" print the value held by the server (read in-process, no OPC UA client);
"set NODEID VALUE" sets it as the PLC program would.
"""

import asyncio
import json
import signal
import sys

from asyncua import Server, ua

from plc.config import OpcUaSettings
from plc.opcua import node_id, populate_server


async def main() -> None:
    port = int(sys.argv[1])
    slots = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    settings = OpcUaSettings(endpoint=f"opc.tcp://127.0.0.1:{port}", **extra)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await populate_server(server, settings, slots)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with server:
        print(f"READY {ns}", flush=True)

        async def serve_stdin() -> None:
            while line := (await reader.readline()).decode():
                parts = line.split()
                node = server.get_node(node_id(ns, *parts[1].split(".")))
                if parts[0] == "get":
                    print(await node.read_value(), flush=True)
                elif parts[0] == "set":
                    vtype = await node.read_data_type_as_variant_type()
                    await node.write_value(ua.Variant(int(parts[2]), vtype))
                    print("OK", flush=True)

        task = asyncio.create_task(serve_stdin())
        await stop.wait()
        task.cancel()


asyncio.run(main())

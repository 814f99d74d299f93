#!/usr/bin/env python3
"""A TCP proxy that can be taken down and brought back: an outage of the server behind it.

Usage: flaky-proxy.py LISTEN_PORT UPSTREAM_PORT   (both on 127.0.0.1)
SIGUSR1: down — every open connection is reset and new ones are refused.
SIGUSR2: up again on the same port.
"""
import asyncio
import signal
import socket
import struct
import sys

listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
conns = set()
server = None


def reset(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close with a RST, as a crashed server or a dropped route does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        reset(writer)
        return
    pair = (writer, up_writer)
    conns.add(pair)
    try:
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    finally:
        conns.discard(pair)


async def up():
    global server
    if server is None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True)


async def down():
    global server
    if server is not None:
        server.close()
        server = None
    for client, upstream in list(conns):
        reset(client)
        upstream.close()
    conns.clear()


async def main():
    await up()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(down()))
    loop.add_signal_handler(signal.SIGUSR2, lambda: asyncio.ensure_future(up()))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    await asyncio.Event().wait()


try:
    asyncio.run(main())
except RuntimeError:
    pass  # stopped by SIGTERM

"""HEALTHCHECK of the full and dev images: healthy when every service the entrypoint started accepts TCP
connections on its port.

The entrypoint writes one "name port" line per service it started into SERVICES_FILE. A container that
only runs a command (training, say) lists none and is healthy for as long as it runs; its progress is for
its own log to show. Standard library only, run by the system Python, so it costs no torch import every
30 seconds.
"""
import os
import socket
import sys

SERVICES_FILE = os.environ.get("SERVICES_FILE", "/tmp/container-services")
CONNECT_TIMEOUT_S = 3


def main():
    try:
        with open(SERVICES_FILE) as file:
            services = [line.split() for line in file if line.strip()]
    except FileNotFoundError:
        return 0  # the entrypoint has not got as far as starting services
    for name, port in services:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            print(f"unhealthy: {name} does not accept connections on port {port} ({error})")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

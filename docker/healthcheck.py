"""HEALTHCHECK of the full and dev images: healthy when every service the entrypoint started works.

The entrypoint writes one line per service it started into SERVICES_FILE: "jupyter PORT TOKEN" and "sshd
PORT". Jupyter is asked for /api/status twice: with the token it must answer 200 (it serves), without it
401 or 403 (authentication is still on). sshd is only looked for among the listening sockets of
/proc/net/tcp and tcp6: a connection would make it log two lines every 30 seconds. A container that only
runs a command (training, say) lists none and is healthy for as long as it runs; its progress is for its own
log to show. Standard library only, run by the system Python, so it costs no torch import every 30 seconds.
"""
import http.client
import os
import sys

SERVICES_FILE = os.environ.get("SERVICES_FILE", "/tmp/container-services")
TIMEOUT_S = 5
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def http_status(port, token=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", "/api/status", headers={"Authorization": f"token {token}"} if token else {})
        return connection.getresponse().status
    finally:
        connection.close()


def check_jupyter(port, token):
    try:
        served, refused = http_status(port, token), http_status(port)
    except OSError as error:
        return f"jupyter does not answer HTTP on port {port} ({error})"
    if served != 200:
        return f"jupyter answers HTTP {served} on port {port} with its token"
    if refused not in (401, 403):
        return f"jupyter answers HTTP {refused} on port {port} without the token: authentication is off"
    return None


def listening_ports():
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                rows = [line.split() for line in file.readlines()[1:]]
        except FileNotFoundError:
            continue  # no IPv6 in this container
        ports |= {int(row[1].rsplit(":", 1)[1], 16) for row in rows if row[3] == TCP_LISTEN}
    return ports


def main():
    try:
        with open(SERVICES_FILE) as file:
            services = [line.split() for line in file if line.strip()]
    except FileNotFoundError:
        return 0  # the entrypoint has not got as far as starting services
    for name, port, *token in services:
        if name == "jupyter":
            problem = check_jupyter(int(port), token[0])
        elif int(port) not in listening_ports():
            problem = f"{name} does not listen on port {port}"
        else:
            problem = None
        if problem:
            print(f"unhealthy: {problem}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

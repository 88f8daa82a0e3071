"""Fails when the running environment holds a distribution that docker/constraints.txt does not pin at its
installed version: run after every `pip install` of docker/Dockerfile, it makes the constraints file a
lock, so that a new dependency of a dependency stops the build instead of floating in unreviewed.

    python docker/locked.py docker/constraints.txt

Standard library only: it runs in the image's virtual environment before anything else is installed.
"""
import re
import sys
from importlib import metadata


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path):
    pins = {}
    with open(path) as file:
        for raw in file:
            line = raw.split("#", 1)[0].strip()
            if line:
                name, separator, version = line.partition("==")
                if not separator:
                    raise SystemExit(f"error: {path}: '{line}' is not an exact pin (name==version)")
                pins[canonical(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


def unpinned(pins):
    """[(name, installed version, pinned version or None)] for every distribution the pins do not cover."""
    found = []
    for distribution in metadata.distributions():
        name, version = canonical(distribution.metadata["Name"]), distribution.version
        if pins.get(name) != version:
            found.append((name, version, pins.get(name)))
    return sorted(found)


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    problems = unpinned(read_pins(argv[1]))
    for name, version, pin in problems:
        print(f"error: {name} {version} is installed but {argv[1]} "
              f"{'pins ' + pin if pin else 'does not pin it'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

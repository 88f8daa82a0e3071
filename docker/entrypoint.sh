#!/bin/sh
# The image's entrypoint, under tini (docker/README.md): warns when /dev/shm is too small for DataLoader workers
# and when no GPU is visible, then hands over to docker/services.py where the image has it (full, dev: JupyterLab
# and sshd) or becomes the command (base). Everything it says goes to stderr: the command's stdout stays its own.
set -eu

# DataLoader workers pass batches to the main process through /dev/shm; Docker's default of 64 MB fills after
# a few and the workers die with "bus error". 1 GiB leaves room for a few workers' prefetched batches.
shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $2 }') || shm_kib=0
if [ "${shm_kib:-0}" -lt 1048576 ]; then
    echo "warning: /dev/shm is $((${shm_kib:-0} / 1024)) MiB; PyTorch DataLoader workers pass batches through it" \
        "and die with 'bus error' when it is full: run with --shm-size=8g or --ipc=host" >&2
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "entrypoint: no NVIDIA driver in the container: start it with --gpus all" \
        "(needs the NVIDIA Container Toolkit)" >&2
fi

if [ -f /usr/local/bin/services.py ]; then
    exec /usr/bin/python3 /usr/local/bin/services.py "$@"
fi
case ${START_JUPYTER:-auto} in 1 | true | yes) services=JupyterLab ;; *) services= ;; esac
if [ -n "${SSH_PUBLIC_KEY:-}" ] || [ -e "${SSH_AUTHORIZED_KEYS_FILE:-$HOME/.ssh/authorized_keys}" ]; then
    services=sshd
fi
if [ -n "$services" ]; then
    echo "error: $services was asked for, but only the full and dev images have it" >&2
    exit 2
fi
if [ $# -eq 0 ]; then set -- bash; fi
exec "$@"

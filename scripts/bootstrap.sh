#!/usr/bin/env bash
# Install everything Ferryman needs on Debian 12: system packages (apt-get) and the pinned Python packages (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static postgresql cpio kmod xz-utils zstd ca-certificates openssl
              python3-venv iproute2 nftables procps syslinux syslinux-common mtools dosfstools fdisk
              libglib2.0-0 libnuma1 libudev1 liburing2)  # the last four: what the lab guest's qemu-ga links against

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "== installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
if ! cmp -s constraints.txt .venv/.ferryman-constraints || ! cmp -s pyproject.toml .venv/.ferryman-pyproject; then
    echo "== installing Python packages (pinned in constraints.txt)"
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
    cp constraints.txt .venv/.ferryman-constraints
    cp pyproject.toml .venv/.ferryman-pyproject
fi
echo "== building the lab guest image"
.venv/bin/python -c "from ferryman.lab.guest import ensure_guest; g = ensure_guest(); print('   ', g.kernel, g.initrd)"
echo "== building the lab guest boot disk"
.venv/bin/python -c "from ferryman.lab.disk_image import ensure_guest_disk; print('   ', ensure_guest_disk().path)"

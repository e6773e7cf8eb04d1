#!/usr/bin/env bash
# The sandbox's tests again, as a user other than root. As root, each call runs as nobody; a
# trainer that is not root keeps its uid in the call and relies on other layers (a user namespace, Landlock,
# the system-call filter), and the tests must hold there too. Run as root: it creates the user
# (GRPO_TEST_USER, default grpo-unprivileged) and copies the package where that user can read it, with a
# virtual environment of its own (pytest, sympy, numpy: what the tests and the sandbox's preloads use).
set -euo pipefail
cd "$(dirname "$0")/.."
user=${GRPO_TEST_USER:-grpo-unprivileged}
if [ "$(id -u)" != 0 ]; then
    echo "run this as root: it creates the unprivileged user $user" >&2
    exit 2
fi
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$user"
stage=$(mktemp -d /tmp/grpo-unprivileged.XXXXXX)
trap 'rm -rf "$stage"' EXIT
cp -r grpo_cli tests "$stage"/
chown -R "$user" "$stage"
as_user() { runuser -u "$user" -- env HOME="$(getent passwd "$user" | cut -d: -f6)" PATH=/usr/bin:/bin "$@"; }
# a Python the user can run: this one, unless it lies in a folder closed to others (pyenv under /root)
python=$(command -v python3)
as_user "$python" -c "" 2>/dev/null || python=/usr/bin/python3
as_user "$python" -m venv "$stage/venv"
as_user "$stage/venv/bin/python" -m pip install -q --disable-pip-version-check pytest sympy numpy
cd "$stage"
as_user "$stage/venv/bin/python" -m pytest -q -p no:cacheprovider --noconftest tests/test_sandbox.py

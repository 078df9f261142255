#!/bin/sh
# Provision a fedmq edge agent on this device from its `fedmq pki device` bundle.
#
#   sudo deploy/provision-agent.sh [options] BUNDLE
#
# BUNDLE is the bundle directory or its .tar.gz (ca.pem, device.pem, device.key,
# device.sign, aggregator.pub, agent.toml).  The script
#   1. creates a venv in /opt/fedmq-agent (--prefix) and pip-installs fedmq into it,
#   2. installs the bundle into /etc/fedmq: agent.toml and the public files 0644, the
#      private keys device.key and device.sign 0600 root:root.  The service runs under
#      a systemd DynamicUser and never reads the keys there: LoadCredential= hands it
#      copies only it can read (see deploy/fedmq-agent.service),
#   3. checks the installed configuration with `fedmq-agent check --config-only` (the
#      device's data need not exist yet: run `fedmq-agent check` once it does),
#   4. installs deploy/fedmq-agent.service, runs `systemctl daemon-reload`, enables the
#      unit and (re)starts it.
# Running it again with the same or a new bundle or package converges to the same
# result: files are replaced atomically, the venv is reused, the unit restarted.
#
# --root DIR stages everything under DIR instead (DIR/opt/fedmq-agent, DIR/etc/fedmq,
# DIR/etc/systemd/system) and only enables the unit offline (`systemctl --root`): for
# tests and for inspecting what would be installed.  The venv's scripts name their
# staged path, so build OS images by running this script inside the image's chroot.
set -eu

PROG=provision-agent
SCRIPT_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
UNIT_NAME=fedmq-agent.service
ETC=/etc/fedmq                  # what the unit's LoadCredential= and ExecStart= name
UNIT_DIR=/etc/systemd/system
DEFAULT_PREFIX=/opt/fedmq-agent  # the unit's ExecStart=
PUBLIC_FILES="agent.toml ca.pem device.pem aggregator.pub"
SECRET_FILES="device.key device.sign"

PREFIX=${FEDMQ_AGENT_PREFIX:-$DEFAULT_PREFIX}
PACKAGE=${FEDMQ_AGENT_PACKAGE:-fedmq[agent]}
PYTHON=${PYTHON:-python3}
UNIT=$SCRIPT_DIR/$UNIT_NAME
ROOT=
START=yes
CHECK=yes
NO_DEPS=
PIP_ARGS=
BUNDLE=

usage() {
    cat <<EOF
usage: $PROG [options] BUNDLE

Install a fedmq edge agent from a \`fedmq pki device\` bundle (a directory or .tar.gz).

options:
  --package SPEC   what pip installs: a requirement, wheel, sdist or source directory
                   (default: $PACKAGE; env FEDMQ_AGENT_PACKAGE)
  --no-deps        pip install --no-deps (dependencies provided otherwise)
  --pip-args ARGS  more pip arguments, e.g. "--index-url https://pypi.plant.local/simple"
  --prefix DIR     the venv (default: $DEFAULT_PREFIX; env FEDMQ_AGENT_PREFIX); another
                   prefix gets a unit drop-in with its ExecStart=
  --python PY      interpreter that creates the venv (default: $PYTHON; env PYTHON)
  --unit FILE      the unit to install (default: $UNIT_NAME beside this script)
  --root DIR       stage under DIR; no daemon-reload, no start (implies --no-start)
  --no-start       enable the unit but do not reload systemd or start it (images)
  --no-check       skip \`fedmq-agent check\` of the installed configuration
  -h, --help       this help
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

note() {
    echo "$PROG: $*"
}

need_value() {
    [ "$2" -ge 2 ] || die "$1 needs a value (see --help)"
}

while [ $# -gt 0 ]; do
    case $1 in
        --package) need_value "$1" $#; PACKAGE=$2; shift 2 ;;
        --package=*) PACKAGE=${1#*=}; shift ;;
        --no-deps) NO_DEPS=--no-deps; shift ;;
        --pip-args) need_value "$1" $#; PIP_ARGS=$2; shift 2 ;;
        --pip-args=*) PIP_ARGS=${1#*=}; shift ;;
        --prefix) need_value "$1" $#; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --python) need_value "$1" $#; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --unit) need_value "$1" $#; UNIT=$2; shift 2 ;;
        --unit=*) UNIT=${1#*=}; shift ;;
        --root) need_value "$1" $#; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --no-start) START=no; shift ;;
        --no-check) CHECK=no; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [ -z "$BUNDLE" ] || die "one bundle at a time (got $BUNDLE and $1)"
            BUNDLE=$1
            shift
            ;;
    esac
done
if [ $# -gt 0 ]; then
    [ -z "$BUNDLE" ] && [ $# -eq 1 ] || die "one bundle at a time"
    BUNDLE=$1
fi
[ -n "$BUNDLE" ] || die "no bundle given: a directory or .tar.gz from \`fedmq pki device\` (see --help)"
case $PREFIX in /*) ;; *) die "--prefix must be an absolute path, not $PREFIX" ;; esac
[ -f "$UNIT" ] || die "unit file $UNIT not found (--unit FILE)"

# Staging root: every installed path is prefixed with it.
if [ -n "$ROOT" ]; then
    (umask 022 && mkdir -p -- "$ROOT") || die "cannot create the staging root $ROOT"
    R=$(CDPATH='' cd -- "$ROOT" && pwd)
    [ "$R" != / ] || R=
    START=no
else
    R=
    [ "$(id -u)" -eq 0 ] || die "run as root (or stage with --root DIR)"
fi
OWNER=
[ "$(id -u)" -ne 0 ] || OWNER=root:root

# Secrets must never be readable by others, not even for a moment while copied.
umask 077
WORK=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX") || die "cannot create a temporary directory"
trap 'rm -rf -- "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- the bundle
if [ -d "$BUNDLE" ]; then
    SRC=$BUNDLE
elif [ -f "$BUNDLE" ]; then
    case $BUNDLE in
        *.tar.gz | *.tgz) ;;
        *) die "$BUNDLE is neither a directory nor a .tar.gz bundle" ;;
    esac
    tar -tzf "$BUNDLE" >"$WORK/members" 2>"$WORK/tar.err" \
        || die "cannot read $BUNDLE: $(cat "$WORK/tar.err")"
    if grep -Eq '^/|(^|/)\.\.(/|$)' "$WORK/members"; then
        die "$BUNDLE holds absolute or '..' paths: refusing to unpack it"
    fi
    mkdir "$WORK/bundle"
    tar -xzf "$BUNDLE" -C "$WORK/bundle" 2>"$WORK/tar.err" \
        || die "cannot unpack $BUNDLE: $(cat "$WORK/tar.err")"
    # `fedmq pki device --archive` puts the files in one top directory (<id>/).
    SRC=$WORK/bundle
    if [ ! -f "$SRC/agent.toml" ]; then
        for dir in "$WORK"/bundle/*/; do
            [ -f "${dir}agent.toml" ] || continue
            [ "$SRC" = "$WORK/bundle" ] || die "$BUNDLE holds more than one bundle"
            SRC=${dir%/}
        done
    fi
else
    die "bundle $BUNDLE does not exist"
fi
for name in $PUBLIC_FILES $SECRET_FILES; do
    [ -f "$SRC/$name" ] \
        || die "bundle $BUNDLE lacks $name (a bundle holds: $PUBLIC_FILES $SECRET_FILES)"
done
if grep -Eq '^[[:space:]]*password[[:space:]]*=' "$SRC/agent.toml"; then
    note "warning: agent.toml holds a broker password but is installed world-readable;" \
        "set FEDMQ_AGENT_BROKER__PASSWORD in a drop-in instead (systemctl edit fedmq-agent)"
fi

# ---------------------------------------------------------------- the venv
VENV=$R$PREFIX
if [ ! -x "$VENV/bin/python" ]; then
    note "creating the venv $VENV"
    (umask 022 && mkdir -p -- "$(dirname -- "$VENV")")
    (umask 022 && "$PYTHON" -m venv "$VENV") \
        || die "cannot create a venv with $PYTHON (Debian/Ubuntu: apt-get install python3-venv)"
else
    note "reusing the venv $VENV"
fi
note "installing $PACKAGE"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
(umask 022 && "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
    --quiet $NO_DEPS $PIP_ARGS "$PACKAGE") || die "pip could not install $PACKAGE into $VENV"
[ -x "$VENV/bin/fedmq-agent" ] || die "$PACKAGE installed no fedmq-agent into $VENV"

# ---------------------------------------------------------------- files
# Copy to a temporary name beside the target, set mode and owner, rename over it: a
# running agent or a crash never sees a half-written or too-open file.
install_file() { # MODE SOURCE TARGET
    tmp=$(dirname -- "$3")/.$(basename -- "$3").$$
    cp -- "$2" "$tmp" || die "cannot write $tmp"
    chmod "$1" "$tmp"
    [ -z "$OWNER" ] || chown "$OWNER" "$tmp"
    mv -f -- "$tmp" "$3" || die "cannot install $3"
}

install_dir() { # MODE DIR (missing parents: 0755, as /etc and /opt are)
    (umask 022 && mkdir -p -- "$2") || die "cannot create $2"
    chmod "$1" "$2"
    [ -z "$OWNER" ] || chown "$OWNER" "$2"
}

install_dir 0755 "$R$ETC"
for name in $PUBLIC_FILES; do
    install_file 0644 "$SRC/$name" "$R$ETC/$name"
done
for name in $SECRET_FILES; do
    install_file 0600 "$SRC/$name" "$R$ETC/$name"
done
note "installed the bundle into $R$ETC (keys 0600, read by systemd's LoadCredential=)"

(umask 022 && mkdir -p -- "$R$UNIT_DIR")
install_file 0644 "$UNIT" "$R$UNIT_DIR/$UNIT_NAME"
DROPIN=$R$UNIT_DIR/$UNIT_NAME.d/provision-prefix.conf
if [ "$PREFIX" != "$DEFAULT_PREFIX" ]; then
    install_dir 0755 "$R$UNIT_DIR/$UNIT_NAME.d"
    cat >"$WORK/dropin" <<EOF
# Written by $PROG: this agent's venv is $PREFIX, not $DEFAULT_PREFIX.
[Service]
ExecStart=
ExecStart=$PREFIX/bin/fedmq-agent run --config $ETC/agent.toml
EOF
    install_file 0644 "$WORK/dropin" "$DROPIN"
else
    rm -f -- "$DROPIN" # an earlier run with another prefix
fi
note "installed $R$UNIT_DIR/$UNIT_NAME"

# ---------------------------------------------------------------- check
if [ "$CHECK" = yes ]; then
    # --config-only: provisioning often precedes the data; the data is checked later.
    if ! "$VENV/bin/fedmq-agent" check --config-only --config "$R$ETC/agent.toml" \
        >"$WORK/check" 2>&1; then
        cat "$WORK/check" >&2
        die "the installed configuration fails \`fedmq-agent check\` (above); fix the bundle" \
            "or the device (e.g. create data.path) and run again (--no-check skips this)"
    fi
    note "fedmq-agent check: the configuration is valid"
fi

# ---------------------------------------------------------------- systemd
if [ -n "$R" ]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --root="$R" --quiet enable "$UNIT_NAME" 2>"$WORK/systemctl" \
            || die "systemctl --root=$R enable failed: $(cat "$WORK/systemctl")"
        note "enabled $UNIT_NAME under $R (not started)"
    else
        note "no systemctl here: enable $UNIT_NAME in the image"
    fi
elif [ "$START" = no ]; then
    systemctl --quiet enable "$UNIT_NAME" || die "systemctl enable $UNIT_NAME failed"
    note "enabled $UNIT_NAME (starts at the next boot)"
else
    systemctl daemon-reload || die "systemctl daemon-reload failed"
    systemctl --quiet enable "$UNIT_NAME" || die "systemctl enable $UNIT_NAME failed"
    systemctl restart "$UNIT_NAME" \
        || die "$UNIT_NAME did not start: journalctl -u ${UNIT_NAME%.service} -n 50"
    note "started $UNIT_NAME: journalctl -u ${UNIT_NAME%.service} -f"
fi

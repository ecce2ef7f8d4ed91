# Sourced (not run) by the scripts in .ci/ and by deploy/tests/run.sh. Bash only.
#
#   tools_dir                  prints the tools cache: $WSGATE_TOOLS, default
#                              ~/.cache/wsgate-tools (created)
#   want PROBE PKG...          queues the Debian packages PKG... unless PROBE is there:
#                              PROBE is a command name, an absolute path, or
#                              `py:MODULE` (a module python3 can import)
#   install_wanted             installs what was queued with apt-get (as root, else
#                              through sudo); nothing when the queue is empty
#
# Checks look for the thing itself (a command, a file), not for a Debian package, so a
# tool installed some other way (another Node, a pyenv Python) is used as it is.

tools_dir() {
    local dir=${WSGATE_TOOLS:-$HOME/.cache/wsgate-tools}
    mkdir -p "$dir"
    (cd "$dir" && pwd)
}

_wsgate_wanted=()

want() {
    local probe=$1
    shift
    case $probe in
        py:*) python3 -c "import ${probe#py:}" >/dev/null 2>&1 && return 0 ;;
        /*) [ -e "$probe" ] && return 0 ;;
        *) command -v "$probe" >/dev/null 2>&1 && return 0 ;;
    esac
    _wsgate_wanted+=("$@")
}

install_wanted() {
    [ ${#_wsgate_wanted[@]} -gt 0 ] || return 0
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing Debian packages: ${_wsgate_wanted[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${_wsgate_wanted[@]}" >/dev/null
    _wsgate_wanted=()
}

# Sourced by scripts/gpu_wheels.sh and scripts/gpu_rehearse.sh: how a PRESENT file (the
# packages a device already has; names separated by commas, spaces or new lines, versions
# allowed) and a venv's packages are read, and pip's noise filtered out.
norm() { tr 'A-Z_.' 'a-z--'; }  # pip's normalised name
present_names() {  # FILE: its package names, normalised, one per line, sorted
  tr ', \t' '\n\n\n' < "$1" | sed 's/[=<>].*//' | norm | { grep -v '^$' || true; } | sort -u
}
# Whether NAME is a line of LIST. A here-string, not `echo "$LIST" | grep -q`: under pipefail
# grep -q's early exit can kill the echo with SIGPIPE (status 141) and the pipeline reads as
# no match (seen under load: a present package counted as missing).
listed() { grep -qxF -- "$1" <<< "$2"; }
DEVICE_OWN="torch|triton|nvidia-.*"  # what a CUDA machine's own torch brings: never carried
venv_pins() {  # PY: its venv's packages (editables left out), one normalised NAME==VERSION a line
  "$1" -m pip list --format=freeze --exclude-editable 2>/dev/null | { grep '==' || true; } \
    | while IFS='=' read -r name _ ver; do echo "$(norm <<< "$name")==$ver"; done
}
quiet() { grep -v -e "is ignored: it is neither" -e '^$' || true; }

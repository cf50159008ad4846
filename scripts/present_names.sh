# Sourced by scripts/gpu_wheels.sh and scripts/gpu_rehearse.sh: how a PRESENT file (the
# packages a device already has; names separated by commas, spaces or new lines, versions
# allowed) is read, and pip's noise filtered out.
norm() { tr 'A-Z_.' 'a-z--'; }  # pip's normalised name
present_names() {  # FILE: its package names, normalised, one per line, sorted
  tr ', \t' '\n\n\n' < "$1" | sed 's/[=<>].*//' | norm | { grep -v '^$' || true; } | sort -u
}
quiet() { grep -v -e "is ignored: it is neither" -e '^$' || true; }

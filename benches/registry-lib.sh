# Shared by the benchmarks: a docker-registry on 127.0.0.1 with its storage under $work (which
# the caller makes, on /dev/shm, and removes). `start_registry [wipe]` (re)starts it, with
# empty storage when asked; `stop_registry` stops it; `requests` counts the HTTP requests it
# has answered. The caller's EXIT trap must call stop_registry.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
reg=127.0.0.1:$port
registry_pid=
stop_registry() {
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
  registry_pid=
}
cat > "$work/registry.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/storage
  delete:
    enabled: true
http:
  addr: $reg
  secret: lathe-bench-$port
EOF
# start_registry [wipe]: (re)starts the registry, with empty storage when asked.
start_registry() {
  stop_registry
  [ "${1:-}" = wipe ] && rm -rf "$work/storage"
  docker-registry serve "$work/registry.yml" >> "$work/registry.log" 2>&1 &
  registry_pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return
    sleep 0.05
  done
  echo "docker-registry did not start: $(tail -5 "$work/registry.log")" >&2; exit 1
}
requests() { grep -c 'response completed' "$work/registry.log" || true; }

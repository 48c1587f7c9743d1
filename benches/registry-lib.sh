# Shared by the benchmarks: a docker-registry on 127.0.0.1 with its storage under $work (which
# the caller makes, on /dev/shm, and removes). `start_registry [wipe]` (re)starts it, with
# empty storage when asked; `stop_registry` stops it; `requests` counts the HTTP requests it
# has answered; `log_mark` and `pushed_since` count the blobs uploaded and their bytes. The
# caller's EXIT trap must call stop_registry.
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
# log_mark: how far the registry's log is, for pushed_since.
log_mark() { wc -l < "$work/registry.log"; }
# pushed_since MARK: "BLOBS BYTES": the blob uploads the registry completed after log_mark
# gave MARK and their bytes (the stored blobs' sizes). Cross-repository mounts and blobs a
# client skipped because the registry had them are not uploads; manifests are not blobs.
pushed_since() {
  local blobs=0 bytes=0 digest
  while read -r digest; do
    blobs=$((blobs + 1))
    bytes=$((bytes + $(stat -c %s "$work/storage/docker/registry/v2/blobs/sha256/${digest:0:2}/$digest/data")))
  done < <(tail -n "+$(($1 + 1))" "$work/registry.log" | grep 'response completed' |
    grep 'method=PUT' | grep 'status=201' |
    sed -n 's|.*/blobs/uploads/.*[?&]digest=sha256%3A\([0-9a-f]\{64\}\).*|\1|p')
  echo "$blobs $bytes"
}

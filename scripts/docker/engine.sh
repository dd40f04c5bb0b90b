# shellcheck shell=bash
# Sourced by scripts/compose-smoke: start a Docker engine for the run and put the host back.
#
# dockerd changes the host when it starts: it turns on net.ipv4.ip_forward, sets the iptables
# FORWARD policy to DROP, adds its chains and NAT rules (filter and nat tables), and creates the
# docker0 bridge (and a br-<id> bridge per network); none of it is undone when it stops.
# engine_start records that state first, engine_stop stops what it started and restores the
# record: the sysctls, the FORWARD policy, every iptables rule and chain that was not there
# before, and the docker0/br-<id> bridges that were not there.
# An engine that was already running is used as it is and left running.
#
# The record lives in $ENGINE_STATE_DIR until it has been restored, so a run that was killed
# (SIGKILL, power loss) is cleaned up by the next one: it adopts the dockerd left behind and the
# record of the host from before it.

ENGINE_STATE_DIR="${GPUFLEET_ENGINE_STATE_DIR:-/var/tmp/gpufleet-smoke/engine}"
ENGINE_STARTED=0
ENGINE_SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.bridge.bridge-nf-call-iptables)
ENGINE_TABLES=(filter nat)

_engine_log() { echo "engine: $*" >&2; }

_engine_ipt() {  # _engine_ipt iptables|ip6tables ARGS...: no-op where the tool is missing
  local tool="$1"
  shift
  command -v "$tool" >/dev/null 2>&1 || return 0
  "$tool" -w "$@"
}

_engine_bridges() {  # the names of docker0 and br-<id> bridges, one a line
  ip -o link show type bridge | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^(docker0|br-[0-9a-f]+)$' || true
}

engine_record_state() {
  local dir="$ENGINE_STATE_DIR" name tool table
  if [ -f "$dir/recorded" ]; then
    _engine_log "keeping the host state recorded by an earlier run ($dir)"
    return 0
  fi
  mkdir -p "$dir"
  : >"$dir/sysctl"
  for name in "${ENGINE_SYSCTLS[@]}"; do
    if [ -r "/proc/sys/${name//.//}" ]; then
      echo "$name=$(cat "/proc/sys/${name//.//}")" >>"$dir/sysctl"
    fi
  done
  for tool in iptables ip6tables; do
    for table in "${ENGINE_TABLES[@]}"; do
      _engine_ipt "$tool" -t "$table" -S >"$dir/$tool.$table" 2>/dev/null || : >"$dir/$tool.$table"
    done
  done
  _engine_bridges >"$dir/bridges"
  touch "$dir/recorded"
}

_engine_restore_iptables() {
  local tool="$1" table="$2" before="$3" line chain
  local -a words
  local now
  now="$(_engine_ipt "$tool" -t "$table" -S 2>/dev/null)" || return 0
  # Rules that appeared, newest first; then the chains that appeared; then the policies.
  while read -r line; do
    [ -n "$line" ] || continue
    read -ra words <<<"${line/#-A /-D }"
    _engine_ipt "$tool" -t "$table" "${words[@]}" || _engine_log "could not delete: $tool -t $table $line"
  done < <(grep '^-A ' <<<"$now" | grep -vxF -f "$before" | tac || true)
  while read -r chain; do
    [ -n "$chain" ] || continue
    if ! { _engine_ipt "$tool" -t "$table" -F "$chain" && _engine_ipt "$tool" -t "$table" -X "$chain"; }; then
      _engine_log "could not remove chain $chain ($tool -t $table)"
    fi
  done < <(grep '^-N ' <<<"$now" | grep -vxF -f "$before" | cut -d' ' -f2 || true)
  while read -r _ chain policy; do
    _engine_ipt "$tool" -t "$table" -P "$chain" "$policy"
  done < <(grep '^-P ' "$before" || true)
}

engine_restore_state() {
  local dir="$ENGINE_STATE_DIR" name value tool table
  [ -f "$dir/recorded" ] || return 0
  while IFS='=' read -r name value; do
    [ -w "/proc/sys/${name//.//}" ] && echo "$value" >"/proc/sys/${name//.//}"
  done <"$dir/sysctl"
  for tool in iptables ip6tables; do
    for table in "${ENGINE_TABLES[@]}"; do
      [ -f "$dir/$tool.$table" ] && _engine_restore_iptables "$tool" "$table" "$dir/$tool.$table"
    done
  done
  # docker0 and the compose networks' br-<id> bridges: dockerd leaves them behind.
  while read -r name; do
    [ -n "$name" ] && ip link delete "$name"
  done < <(_engine_bridges | grep -vxF -f "$dir/bridges" || true)
  rm -rf "$dir"
}

_engine_pid() {
  local pid
  pid="$(cat "$ENGINE_STATE_DIR/dockerd.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

engine_start() {
  if _engine_pid >/dev/null; then
    _engine_log "adopting the dockerd an earlier run left ($(_engine_pid))"
    ENGINE_STARTED=1
  elif docker info >/dev/null 2>&1; then
    _engine_log "using the Docker engine that is already running (left running afterwards)"
    return 0
  else
    engine_record_state
    # The MTU of the host's route out: a bridge at 1500 behind a smaller link stalls TLS
    # downloads (pip, apt) inside builds.
    local dev mtu
    dev="$(ip route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1); exit}')"
    mtu="$(cat "/sys/class/net/${dev:-eth0}/mtu" 2>/dev/null || echo 1500)"
    # Everything dockerd starts (containerd, build steps, containers) inherits its niceness:
    # the builds and the fleet yield the CPUs and the disk to whoever else works on this
    # machine (best-effort I/O at the lowest priority, not "idle", which can starve).
    # 9>&-: dockerd outlives a killed caller, so it must not hold compose-smoke's lock.
    nice -n 19 ionice -c 2 -n 7 dockerd --mtu "$mtu" --storage-driver overlay2 \
      --pidfile "$ENGINE_STATE_DIR/dockerd.pid.daemon" >"$ENGINE_STATE_DIR/dockerd.log" 2>&1 9>&- &
    echo $! >"$ENGINE_STATE_DIR/dockerd.pid"
    ENGINE_STARTED=1
    _engine_log "started dockerd (pid $!, mtu $mtu, log $ENGINE_STATE_DIR/dockerd.log)"
  fi
  local _
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    _engine_pid >/dev/null || break
    sleep 1
  done
  _engine_log "dockerd did not come up; its log ends:"
  tail -n 20 "$ENGINE_STATE_DIR/dockerd.log" >&2 || true
  return 1
}

engine_stop() {
  [ "$ENGINE_STARTED" = 1 ] || return 0
  local pid _
  if pid="$(_engine_pid)"; then
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      _engine_log "dockerd ignored SIGTERM for 60 s: SIGKILL"
      kill -KILL "$pid"
    fi
  fi
  cp "$ENGINE_STATE_DIR/dockerd.log" "${ENGINE_LOG_COPY:-/dev/null}" 2>/dev/null || true
  engine_restore_state
  ENGINE_STARTED=0
  _engine_log "dockerd stopped, host state restored"
}

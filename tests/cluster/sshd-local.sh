#!/usr/bin/env bash
# Throwaway two-node SSH "cluster" on loopback for multi-node launcher (pdsh) tests.
#   sshd-local.sh start DIR  -> prints exactly one line: export PATH=DIR/bin:$PATH
#   sshd-local.sh stop DIR   -> kills only the sshd listener whose pid is in DIR/sshd.pid
# llmbench-node0 = 127.0.0.1, llmbench-node1 = 127.0.0.2, one private sshd on both.
# Keys, configs, known_hosts, pid and log all live in DIR; ~/.ssh, /etc/ssh and
# /etc/hosts are never touched (ssh -F skips /etc/ssh/ssh_config).
# DIR/bin/ssh wraps `/usr/bin/ssh -F DIR/ssh_config`. DeepSpeed's check
# (`ssh -o PasswordAuthentication=no HOST hostname`) and pdsh's ssh rcmd module
# (pdsh 2.34 execs bare "ssh" via PATH, args PDSH_SSH_ARGS [default "-2 -a -x -l%u %h"]
# + PDSH_SSH_ARGS_APPEND) both pick it up once DIR/bin leads PATH. Without the wrapper,
# PDSH_SSH_ARGS_APPEND="-F DIR/ssh_config" works for pdsh but not DeepSpeed's check.
# Remote commands get sshd's login env (default PATH, then root's ~/.bashrc, which
# Debian's bash sources for sshd commands), not the caller's environment.
set -euo pipefail

say() { echo "sshd-local: $*" >&2; }
die() { say "$*"; [ -f "$DIR/sshd.log" ] && tail -n 20 "$DIR/sshd.log" >&2; exit 1; }

cmd=${1:-}; DIR=${2:-}
case "$cmd" in start|stop) [ -n "$DIR" ] ;; *) false ;; esac ||
  { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ "$cmd" = start ] && mkdir -p "$DIR"
[ -d "$DIR" ] || exit 0                   # stop on a missing DIR: nothing to do
DIR=$(cd "$DIR" && pwd)                   # absolute: sshd needs absolute paths

stop() {
  [ -f "$DIR/sshd.pid" ] || return 0
  local pid; pid=$(cat "$DIR/sshd.pid")
  # Only kill it if that pid is still an sshd started with our config (pid reuse guard).
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/sshd_config"; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$DIR/sshd.pid"
}

start() {
  stop   # a leftover sshd from an earlier run in the same DIR
  # A port that is free on both loopback addresses.
  PORT=$(python3 -c 'import socket
for _ in range(50):
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    try:
        b = socket.socket(); b.bind(("127.0.0.2", p)); b.close(); a.close(); print(p); break
    except OSError: a.close()')
  [ -n "$PORT" ] || die "no free port"
  rm -f "$DIR"/host_key* "$DIR"/client_key* "$DIR/known_hosts"
  ssh-keygen -q -t ed25519 -N '' -C llmbench-host -f "$DIR/host_key"
  ssh-keygen -q -t ed25519 -N '' -C llmbench-client -f "$DIR/client_key"
  cp "$DIR/client_key.pub" "$DIR/authorized_keys"
  mkdir -p /run/sshd && chmod 0755 /run/sshd   # privilege-separation dir sshd insists on
  cat >"$DIR/sshd_config" <<EOF
ListenAddress 127.0.0.1:$PORT
ListenAddress 127.0.0.2:$PORT
HostKey $DIR/host_key
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
# pdsh (-f 1024) opens all node connections at once; don't throttle them.
MaxStartups 100:30:200
MaxSessions 100
UseDNS no
PrintMotd no
LogLevel VERBOSE
EOF
  cat >"$DIR/ssh_config" <<EOF
Host llmbench-node0
  HostName 127.0.0.1
Host llmbench-node1
  HostName 127.0.0.2
Host llmbench-node0 llmbench-node1
  Port $PORT
  User root
  IdentityFile $DIR/client_key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile $DIR/known_hosts
  GlobalKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 5
EOF
  mkdir -p "$DIR/bin"
  printf '#!/bin/sh\nexec /usr/bin/ssh -F %s/ssh_config "$@"\n' "$DIR" >"$DIR/bin/ssh"
  chmod +x "$DIR/bin/ssh"
  : >"$DIR/sshd.log"
  # sshd must be started by absolute path (it re-execs itself); it daemonizes.
  /usr/sbin/sshd -t -f "$DIR/sshd_config" 2>>"$DIR/sshd.log" || die "sshd config test failed"
  /usr/sbin/sshd -f "$DIR/sshd_config" -E "$DIR/sshd.log" || die "sshd failed to start"
  local end=$((SECONDS + 10))  # wait up to ~10 s; each probe is itself capped at 2 s
  while [ $SECONDS -lt $end ]; do
    # sshd keeps running if only one ListenAddress fails to bind (port raced away).
    grep -q 'Bind to port .* failed' "$DIR/sshd.log" && { stop; return 3; }
    if timeout 2 "$DIR/bin/ssh" llmbench-node0 true 2>/dev/null &&
       timeout 2 "$DIR/bin/ssh" llmbench-node1 true 2>/dev/null; then
      say "sshd pid $(cat "$DIR/sshd.pid") on 127.0.0.1/127.0.0.2:$PORT"
      echo "export PATH=$DIR/bin:$PATH"
      return 0
    fi
    sleep 0.1
  done
  timeout 5 "$DIR/bin/ssh" llmbench-node0 true || true   # show the client-side error once
  stop; die "sshd did not accept connections within 10 s"
}

case "$cmd" in
  start) for _ in 1 2 3; do   # retry with a fresh port if the bind raced (rc 3)
           # a subshell, not `start || ...`: errexit is ignored inside an || list
           set +e; (set -e; start); rc=$?; set -e
           [ $rc -eq 3 ] || exit $rc; say "port in use, retrying"
         done; die "could not bind a free port" ;;
  stop) stop ;;
esac

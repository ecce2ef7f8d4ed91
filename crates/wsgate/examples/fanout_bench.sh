#!/bin/bash
# Usage (from the repository root, after `cargo build --release -p wsgate --bins --example fanout_bench`):
#   SUBS=100 MSGS=10000 RATE=2000 crates/wsgate/examples/fanout_bench.sh
# Runs the fan-out measurement: memory (1 node), redis (publisher and subscribers on
# different nodes). Bounded: every process is killed at the end.
set -u
BIN=${BIN:-./target/release}
SUBS=${SUBS:-100}; MSGS=${MSGS:-5000}; RATE=${RATE:-1000}
RP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port $RP --save "" --appendonly no --daemonize no --loglevel warning >/dev/null &
sleep 0.5
COMMON="--log-level warn --rate-limit 1000000 --rate-burst 1000000 --max-inflight-publishes 4096"
$BIN/wsgate --listen 127.0.0.1:18501 --admin-listen 127.0.0.1:18601 $COMMON & M=$!
$BIN/wsgate --listen 127.0.0.1:18502 --admin-listen 127.0.0.1:18602 $COMMON --redis-url redis://127.0.0.1:$RP/ & A=$!
$BIN/wsgate --listen 127.0.0.1:18503 --admin-listen 127.0.0.1:18603 $COMMON --redis-url redis://127.0.0.1:$RP/ & B=$!
sleep 1
RPID=$(redis-cli -p $RP info server | awk -F: '/^process_id/{print $2}' | tr -d '\r')
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() { # label pub_port sub_port
  local m0=$(cpu $M) a0=$(cpu $A) b0=$(cpu $B) r0=$(cpu $RPID)
  echo "$1:"; $BIN/examples/fanout_bench ws://127.0.0.1:$2/ws ws://127.0.0.1:$3/ws $SUBS $MSGS $RATE
  echo "  cpu ticks (1/100 s): memory-node $(( $(cpu $M)-m0 )) node-A $(( $(cpu $A)-a0 )) node-B $(( $(cpu $B)-b0 )) redis $(( $(cpu $RPID)-r0 ))"
}
run "memory, 1 node" 18501 18501
run "redis, same node" 18502 18502
run "redis, publisher on A, subscribers on B" 18502 18503
kill $M $A $B; redis-cli -p $RP shutdown nosave >/dev/null 2>&1; wait 2>/dev/null

#!/bin/sh
# Usage (root, from the module root): go build -o tmp/pcpd ./cmd/pcpd; go build -o tmp/pcp-conformance ./cmd/pcp-conformance;
#   conformance/testdata/two-namespaces.sh [pcp-conformance flags, e.g. -json FILE] > report.md
# Two throwaway namespaces (host with pcpd serve on lan0, client), then
# pcp-conformance from the client namespace. Everything is removed at the end.
set -e
R=$$; H=pcpdt-$R-h; C=pcpdt-$R-c; D=$(mktemp -d)
cleanup() { [ -f $D/pid ] && kill $(cat $D/pid) 2>/dev/null; sleep 0.5; ip netns del $H 2>/dev/null; ip netns del $C 2>/dev/null; rm -rf $D; }
trap cleanup EXIT
ip netns add $H; ip netns add $C
ip link add vh$R type veth peer name vc$R
ip link set vh$R netns $H; ip link set vc$R netns $C
ip -n $H link set vh$R name lan0; ip -n $C link set vc$R name eth0
for n in $H $C; do ip -n $n link set lo up; ip netns exec $n sh -c 'echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad; echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad'; done
ip -n $H link set lan0 up; ip -n $C link set eth0 up
ip -n $H addr add 2001:db8:1:2::1/64 dev lan0 nodad; ip -n $H addr add 10.100.0.1/24 dev lan0
ip -n $C addr add 2001:db8:1:2::10/64 dev eth0 nodad; ip -n $C addr add 10.100.0.2/24 dev eth0
ip netns exec $H ${PCPD:-tmp/pcpd} serve --interface lan0 --client c1=2001:db8:1:2::/64,10.100.0.2/32 \
  --external-ipv4 198.51.100.1 --state-dir $D/state --socket $D/sock --nft-table pcpdconf --log-level warn >$D/log 2>&1 &
echo $! > $D/pid; sleep 2
ip netns exec $C ${PCP_CONFORMANCE:-tmp/pcp-conformance} -server '[2001:db8:1:2::1]:5351' -server4 10.100.0.1 \
  -external-ipv4 198.51.100.1 -natpmp 1 -third-party 2001:db8:1:2::20 -nonce-replaces 1 -filter-limit 8 \
  -name "pcpd via pcp-conformance (no lab hooks)" "$@"

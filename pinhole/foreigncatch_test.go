package pinhole_test

import (
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestForeignDNATCtKernel (root; review h/revl9, issue 9): the admin's
// forwards by conntrack's tuple as nft compiles them and the kernel
// dumps them (google/nftables cannot parse the chain: pcpd's own
// decoder reads it). Reserved: 4001 (ct original daddr, ours), 4002 (ct
// reply proto-src: a new connection's destination port), 4004 (a mark
// beside tcp dport), 4005 (a source condition), 4007-4008 (ct original
// proto-dst range), 4009; not 4006 or 4010 (another address, by ct
// original daddr and ct reply ip saddr). The source port (ct original
// proto-src) is a catch-all not sure; the UDP catch-all whose every
// condition is read ("ct original proto-dst != 1-1023") refuses. Before:
// 'TCP ports 4001,4004-4010, want 4001-4002,4004-4005,4007-4009'.
func TestForeignDNATCtKernel(t *testing.T) {
	ns := netlab.NewNS(t, "fdct")
	b := newBackend(t, ns, pinhole.Config{})
	loadNft(t, ns, `table ip admin {
	chain pre {
		type nat hook prerouting priority dstnat;
		ct original daddr 198.51.100.1 tcp dport 4001 dnat to 10.100.2.7
		meta l4proto tcp ct reply proto-src 4002 dnat to 10.100.2.7
		meta l4proto tcp ct original proto-src 4003 dnat to 10.100.2.7
		ct mark 0x1 tcp dport 4004 dnat to 10.100.2.7
		ct original ip saddr 10.0.0.0/8 tcp dport 4005 dnat to 10.100.2.7
		ct original daddr 203.0.113.9 tcp dport 4006 dnat to 10.100.2.7
		meta l4proto tcp ct original proto-dst 4007-4008 dnat to 10.100.2.7
		ct original bytes > 0 tcp dport 4009 dnat to 10.100.2.7
		ct reply ip saddr 203.0.113.9 tcp dport 4010 dnat to 10.100.2.7
		meta l4proto udp ct original proto-dst != 1-1023 dnat to 10.100.2.7
	}
}
`)
	f, err := b.ForeignDNAT(netip.MustParseAddr("198.51.100.1"), 1024, 65535)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := f.TCP.String(), "4001-4002,4004-4005,4007-4009"; got != want {
		t.Errorf("TCP ports %s, want %s", got, want)
	}
	if got := f.UDP.String(); got != "" {
		t.Errorf("UDP ports %s, want none (a catch-all)", got)
	}
	var sureUDP, unsureTCP int
	for _, r := range f.CatchAll {
		switch {
		case r.Before && r.Why == "" && r.UDP && !r.TCP:
			sureUDP++
		case r.Why != "" && r.TCP && !r.UDP:
			unsureTCP++
		default:
			t.Errorf("catch-all %v: TCP %v UDP %v before %v why %q", r, r.TCP, r.UDP, r.Before, r.Why)
		}
	}
	if sureUDP != 1 || unsureTCP != 1 || len(f.Undecoded) != 0 {
		t.Errorf("catch-alls %+v, undecoded %+v: want the UDP one (every condition read) and the proto-src one (not sure)", f.CatchAll, f.Undecoded)
	}
}

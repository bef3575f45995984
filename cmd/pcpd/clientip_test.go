package main

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/pcp"
)

// TestClientIPThroughLoopback (issue 9, review h/revh3, LOW): pcpd map
// and announce, run on the host with --server one of its own addresses
// and --client-ip another, fail at once with an error that names the
// cause (the request goes through loopback, where pcpd takes only the
// served address's own) and what to do, instead of timing out: pcpd's
// socket filter (server.hostOwnFilter) drops such a request unanswered.
// The responder here drops as pcpd does. Without --client-ip, or with
// the server's address, the request goes out and is answered.
func TestClientIPThroughLoopback(t *testing.T) {
	// As pcpd's serving sockets on loopback: only the served address's
	// own requests are answered.
	self := netip.MustParseAddr("127.0.0.1")
	addr := respondFrom(t, pcp.Success, func(src netip.Addr) bool { return src == self })
	for _, tc := range []struct {
		name string
		args []string
		code int
		want []string // in stderr (code != 0) or stdout
	}{
		{"map, another loopback address", []string{"map", "--client-ip", "127.0.0.2", "--port", "22"}, exitUsage,
			[]string{"--client-ip 127.0.0.2", "127.0.0.1 is this host's own", "through loopback", "ip netns exec"}},
		{"map, IPv4-mapped form", []string{"map", "--client-ip", "::ffff:127.0.0.3", "--port", "22"}, exitUsage,
			[]string{"--client-ip 127.0.0.3", "through loopback"}},
		{"announce, another loopback address", []string{"announce", "--client-ip", "127.0.0.2"}, exitUsage,
			[]string{"--client-ip 127.0.0.2", "through loopback"}},
		{"map, the server's own address", []string{"map", "--client-ip", "127.0.0.1", "--port", "22"}, exitOK,
			[]string{"result    SUCCESS"}},
		{"map, no --client-ip", []string{"map", "--port", "22"}, exitOK, []string{"result    SUCCESS"}},
	} {
		args := append(tc.args, "--server", addr, "--timeout", "2s")
		code, out, errOut := pcpd(t, args...)
		text := out
		if tc.code != exitOK {
			text = errOut
		}
		if code != tc.code {
			t.Errorf("%s: exit %d, want %d (stdout %q, stderr %q)", tc.name, code, tc.code, out, errOut)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(text, w) {
				t.Errorf("%s: output lacks %q: %q", tc.name, w, text)
			}
		}
	}
}

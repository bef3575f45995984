package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestPMPStrictNonce (issue 9, found by h/attack, fixed by h/natprio):
// NAT-PMP carries no nonce, so with --strict-nonce a NAT-PMP request from
// a PCP MAP's own address must not do what a PCP request with another
// nonce may not (MAP-14, MAP-19): delete the MAP (PMP-07), renew it into
// a NAT-PMP lease with a zero nonce (PMP-05), or take it with a delete-all
// (PMP-08: the NAT-PMP mappings go, the MAP stays, and the reply is
// NOT_AUTHORIZED/REFUSED, RFC 6886 §3.4's non-zero code for a partial
// delete-all, §3.5 code 2). Without strict nonces, unchanged: each of
// them goes through (PROTOCOL.md choice (c)). Before the fix every strict
// row failed with result 0 ("strict: NAT-PMP result 0, want 2") and the
// MAP gone or turned into a NAT-PMP lease.
func TestPMPStrictNonce(t *testing.T) {
	const pcpPort, pmpPort = 8080, 8081
	for _, tc := range []struct {
		name     string
		port     uint16 // NAT-PMP internal port (0: delete-all)
		life     time.Duration
		strict   bool
		want     pcp.PMPResultCode
		mapKept  bool       // the PCP MAP is still there, as it was
		mapKind  store.Kind // else: what it became (0: gone)
		pmpKept  bool       // the client's NAT-PMP mapping is still there
		extKept  bool       // the reply reports the MAP's external port
		lifeKept bool       // the reply reports the requested lifetime
	}{
		{name: "delete", port: pcpPort, strict: true, want: pcp.PMPNotAuthorized, mapKept: true, pmpKept: true},
		{name: "renew", port: pcpPort, life: 2 * time.Hour, strict: true, want: pcp.PMPNotAuthorized, mapKept: true, pmpKept: true},
		{name: "delete-all", port: 0, strict: true, want: pcp.PMPNotAuthorized, mapKept: true},
		{name: "own NAT-PMP mapping deleted", port: pmpPort, strict: true, want: pcp.PMPSuccess, mapKept: true},
		{name: "own NAT-PMP mapping renewed", port: pmpPort, life: 2 * time.Hour, strict: true, want: pcp.PMPSuccess, mapKept: true, pmpKept: true, lifeKept: true},
		{name: "delete", port: pcpPort, want: pcp.PMPSuccess, pmpKept: true},
		{name: "renew", port: pcpPort, life: 2 * time.Hour, want: pcp.PMPSuccess, mapKind: store.KindNATPMP, pmpKept: true, extKept: true, lifeKept: true},
		{name: "delete-all", port: 0, want: pcp.PMPSuccess},
	} {
		mode := "default"
		if tc.strict {
			mode = "strict"
		}
		t.Run(mode+" "+tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, _ *policy.Config) { c.StrictNonce = tc.strict })
			h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, pcpPort, 0, time.Hour, 1)), pcp.Success)
			if r := h.pmp(v4A, pcp.PMPOpMapTCP, pmpPort, 0, time.Hour); r.Result != pcp.PMPSuccess {
				t.Fatalf("the client's NAT-PMP mapping: %+v", r)
			}
			was, _ := h.lease(ownerA, 6, v4A, pcpPort)
			r := h.pmp(v4A, pcp.PMPOpMapTCP, tc.port, 0, tc.life)
			if r.Result != tc.want {
				t.Fatalf("%s: NAT-PMP result %d, want %d (%+v)", mode, r.Result, tc.want, r)
			}
			if r.InternalPort != tc.port {
				t.Errorf("internal port %d, want %d copied", r.InternalPort, tc.port)
			}
			if tc.extKept != (r.ExternalPort == was.ExternalPort && r.ExternalPort != 0) && tc.port == pcpPort {
				t.Errorf("external port %d (the MAP's is %d)", r.ExternalPort, was.ExternalPort)
			}
			if tc.lifeKept != (r.Lifetime == tc.life && tc.life != 0) {
				t.Errorf("lifetime %v", r.Lifetime)
			}
			l, ok := h.lease(ownerA, 6, v4A, pcpPort)
			switch {
			case tc.mapKept && (!ok || l.Kind != store.KindMap || l.Nonce != (pcp.Nonce{1}) || !l.Expires.Equal(was.Expires)):
				t.Errorf("%s: the PCP MAP was changed: %v %+v (was %+v)", mode, ok, l, was)
			case !tc.mapKept && tc.mapKind == 0 && ok:
				t.Errorf("%s: the PCP MAP is still there: %+v", mode, l)
			case !tc.mapKept && tc.mapKind != 0 && (!ok || l.Kind != tc.mapKind):
				t.Errorf("%s: the PCP MAP: %v %+v, want kind %v", mode, ok, l, tc.mapKind)
			}
			if _, ok := h.fw.Holes()[hole(6, v4A, pcpPort, ext4, was.ExternalPort)]; ok != (tc.mapKept || tc.mapKind != 0) {
				t.Errorf("%s: the MAP's kernel element present %v", mode, ok)
			}
			if _, ok := h.lease(ownerA, 6, v4A, pmpPort); ok != tc.pmpKept {
				t.Errorf("%s: the client's NAT-PMP mapping present %v, want %v", mode, ok, tc.pmpKept)
			}
		})
	}
}

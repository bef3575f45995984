package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// liveSNAT is a live IPv4 mapping of oddSNAT's and its SNAT companion as
// nft lists it (the text before the timeout, and the data).
type liveSNAT struct {
	p         pinhole.Pinhole
	set       string
	key, data string
}

// wideOf is the internet's /24, the remote prefix of the filtered MAPs
// of these tests.
func wideOf(l *lab) netip.Prefix { return netip.PrefixFrom(l.topo.InternetV4, 24).Masked() }

// liveSNATs asks for the IPv4 MAPs reqs (of the lab's client c4; a
// filtered one from wideOf) and returns them as the kernel should hold
// them: the mapping and its SNAT companion's set, key and data.
func liveSNATs(t *testing.T, l *lab, reqs []*pcp.Request) (lives []liveSNAT) {
	t.Helper()
	c4, pub, wide := l.topo.ClientV4, l.topo.HostPublicV4, wideOf(l)
	for i, r := range reqs {
		resp := l.pcp(r)
		if resp.Result != pcp.Success {
			t.Fatalf("MAP %d: %+v", i, resp)
		}
		p := pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: r.Map.InternalPort,
			ExternalAddr: pub, ExternalPort: resp.Map.ExternalPort}
		ls := liveSNAT{p: p, set: "snat4", key: fmt.Sprintf("%s . tcp . %d ", c4, p.InternalPort)}
		if len(r.Options.Filters) > 0 {
			p.RemotePrefix = wide
			ls.p, ls.set, ls.key = p, "snat4_filter", fmt.Sprintf("%s . tcp . %d . %s . 0-65535 ", c4, p.InternalPort, wide)
		}
		ls.data = fmt.Sprintf(": %s . %d", pub, p.ExternalPort)
		lives = append(lives, ls)
	}
	return lives
}

// oddSNAT is the setup of TestE2EUndoesOddSNAT and
// TestE2EAuditUndoesOddSNAT (h/oddsnat): three live IPv4 MAPs of c4
// (3000 and 9090 unfiltered, 1500 from the internet's /24), then, by
// hand, SNAT elements pcpd never writes beside their companions: a
// snat4_filter port range over 1500's (c4:1000-2000 from everywhere ->
// pub:29999), a catch-all in snat4 and in snat4_filter, and, in one
// transaction, 3000's companion replaced by one to 0.0.0.0:0. Each sends
// new outbound flows of c4 from where it says, for ever. It returns the
// live mappings and the elements added (set: nft's syntax).
func oddSNAT(t *testing.T, l *lab) (lives []liveSNAT, forged [][2]string) {
	c4, pub := l.topo.ClientV4, l.topo.HostPublicV4
	lives = liveSNATs(t, l, []*pcp.Request{
		mapReq(c4, pcp.ProtoTCP, 3000, 23000, time.Hour, 1),
		mapReq(c4, pcp.ProtoTCP, 9090, 29090, time.Hour, 2),
		mapFiltered(c4, 1500, 21500, wideOf(l), 3),
	})
	forged = [][2]string{
		{"snat4_filter", fmt.Sprintf("%s . tcp . 1000-2000 . 0.0.0.0/0 . 0-65535 : %s . 29999", c4, pub)},
		{"snat4", fmt.Sprintf("* : %s . 29998", pub)},
		{"snat4_filter", fmt.Sprintf("* : %s . 29997", pub)},
		{"snat4", fmt.Sprintf("%s . tcp . 3000 : 0.0.0.0 . 0", c4)},
	}
	script := fmt.Sprintf("delete element inet pcpd snat4 { %s . tcp . 3000 }\n", c4)
	for _, f := range forged {
		script += fmt.Sprintf("add element inet pcpd %s { %s }\n", f[0], f[1])
	}
	l.topo.Host.MustRun(t, "sh", "-c", "nft -f - <<'EOF'\n"+script+"EOF\n")
	return lives, forged
}

// oddSNATLeft says what is wrong after oddSNAT's undo (nil: the forged
// elements gone, each live mapping's map element and SNAT companion
// there, the former with at most its lease's hour left).
func oddSNATLeft(t *testing.T, l *lab, lives []liveSNAT, forged [][2]string) error {
	if err := byHandLeft(t, l, forged); err != nil {
		return err
	}
	for _, ls := range lives {
		if left, held := l.kernelElem(ls.p); !held || left > time.Hour {
			return fmt.Errorf("live mapping %s: held %v, %v left (want held, at most 1h)", ls.p, held, left)
		}
		if !companionHeld(t, l, ls) {
			return fmt.Errorf("live mapping %s: its SNAT companion %s{ %s... %s } not held", ls.p, ls.set, ls.key, ls.data)
		}
	}
	return nil
}

// companionHeld: ls's SNAT companion is in its map (one line of nft's
// listing holds its key and its data).
func companionHeld(t *testing.T, l *lab, ls liveSNAT) bool {
	out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", ls.set)
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, ls.key) && strings.Contains(line, ls.data) {
			return true
		}
	}
	return false
}

// TestE2EUndoesOddSNAT (review h/revr6, known gap closed by h/oddsnat):
// the watch removes oddSNAT's elements (four shapes pcpd never writes in
// its SNAT maps), the live mappings and their companions kept (3000's
// put back in place of the element that replaced it); an audit after
// finds nothing left to do and changes none of it. Before, the watch
// dropped all but the catch-alls (snatPinhole) and List read no SNAT
// map: 'still held (no lease)' after 20s.
func TestE2EUndoesOddSNAT(t *testing.T) {
	l := watchLab(t)
	lives, forged := oddSNAT(t, l)
	l.marker(t, 7310)
	if err := netlab.Eventually(watchBound, func() error { return oddSNATLeft(t, l, lives, forged) }); err != nil {
		t.Errorf("watch: %v after %v", err, watchBound)
	}
	l.srv.auditFirewall(context.Background())
	if err := oddSNATLeft(t, l, lives, forged); err != nil {
		t.Errorf("audit: %v", err)
	}
}

// TestE2EAuditUndoesOddSNAT (h/oddsnat): with the watch off (as when it
// is deaf: notifications lost), one audit removes oddSNAT's elements,
// the catch-alls included, and puts 3000's companion back; the live
// mappings' elements and companions kept. Before, List read no SNAT map:
// 'still held (no lease)' after the audit, 3000's companion missing.
func TestE2EAuditUndoesOddSNAT(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	lives, forged := oddSNAT(t, l)
	if err := byHandLeft(t, l, forged); err == nil {
		t.Fatal("no element added by hand: the test proves nothing")
	}
	l.srv.auditFirewall(context.Background())
	if err := oddSNATLeft(t, l, lives, forged); err != nil {
		t.Errorf("audit: %v", err)
	}
	l.srv.auditFirewall(context.Background()) // a second audit changes nothing
	if err := oddSNATLeft(t, l, lives, forged); err != nil {
		t.Errorf("second audit: %v", err)
	}
}

// failCatchAll is the lab's Backend whose next Apply holding a catch-all
// element's Delete fails with that op to blame (as deleteCatchAll's
// transaction failing: ENOMEM, a deadline), sending nothing.
type failCatchAll struct {
	*pinhole.Backend
	mu    sync.Mutex
	fails int
}

func (f *failCatchAll) Apply(ops []pinhole.Op) error {
	for i, op := range ops {
		if op.Kind != pinhole.Delete || !strings.Contains(op.Pinhole.String(), "catch-all") {
			continue
		}
		f.mu.Lock()
		fail := f.fails > 0
		if fail {
			f.fails--
		}
		f.mu.Unlock()
		if fail {
			return &pinhole.OpError{Index: i, Op: op, Err: errors.New("injected: delete catch-all element failed")}
		}
	}
	return f.Backend.Apply(ops)
}

// TestE2EWatchRetriesCatchAllUndo (h/oddsnat; review h/revca, left item
// 1): the watch's undo of a snat4 catch-all fails once (injected); the
// next pass tries it again and it is gone, the live mapping's companion
// kept. Before, the failed undo was tried by nothing ('snat4 still holds
// a catch-all' after 20s; check and audit an hour apart).
func TestE2EWatchRetriesCatchAllUndo(t *testing.T) {
	l := watchLab(t)
	fw := &failCatchAll{Backend: l.fw, fails: 1}
	l.restartWith(func(s *Server) { s.fw = fw })
	c4, pub := l.topo.ClientV4, l.topo.HostPublicV4
	resp := l.pcp(mapReq(c4, pcp.ProtoTCP, 9090, 29090, time.Hour, 1))
	if resp.Result != pcp.Success {
		t.Fatalf("MAP: %+v", resp)
	}
	live := liveSNAT{set: "snat4", key: fmt.Sprintf("%s . tcp . 9090 ", c4), data: fmt.Sprintf(": %s . %d", pub, resp.Map.ExternalPort)}
	l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", "snat4", fmt.Sprintf("{ * : %s . 9999 }", pub))
	err := netlab.Eventually(watchBound, func() error {
		if out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4"); strings.Contains(out, "*") {
			return fmt.Errorf("snat4 still holds a catch-all (no lease):\n%s", out)
		}
		return nil
	})
	if err != nil {
		t.Errorf("%v after %v", err, watchBound)
	}
	fw.mu.Lock()
	if fw.fails != 0 {
		t.Error("no undo of the catch-all failed: the test proves nothing")
	}
	fw.mu.Unlock()
	if !companionHeld(t, l, live) {
		t.Error("the live mapping's SNAT companion lost")
	}
}

// TestE2EAuditUndoesSNATWithoutMapping (h/oddsnat): with the watch off,
// two snat4 companions of pcpd's exact shape whose map elements are
// gone: one added by hand for no mapping (c4:9191 -> pub:29175, no
// lease: every new outbound flow of c4:9191 leaves from pub:29175), one
// a live mapping's own (c4:9090), its napt4 element deleted by hand. One
// audit deletes the former and leaves the latter as it is, putting the
// map element back. Before, List dropped every companion: 'still held
// (no lease)' after the audit.
func TestE2EAuditUndoesSNATWithoutMapping(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	c4, pub := l.topo.ClientV4, l.topo.HostPublicV4
	live := liveSNATs(t, l, []*pcp.Request{mapReq(c4, pcp.ProtoTCP, 9090, 29090, time.Hour, 1)})[0]
	forged := [][2]string{{"snat4", fmt.Sprintf("%s . tcp . 9191 : %s . 29175", c4, pub)}}
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd napt4 { %s . tcp . %d }\nadd element inet pcpd snat4 { %s }\nEOF\n",
		pub, live.p.ExternalPort, forged[0][1]))
	if _, held := l.kernelElem(live.p); held {
		t.Fatal("the live mapping's map element not deleted: the test proves nothing")
	}
	l.srv.auditFirewall(context.Background())
	if err := oddSNATLeft(t, l, []liveSNAT{live}, forged); err != nil {
		t.Errorf("audit: %v", err)
	}
}

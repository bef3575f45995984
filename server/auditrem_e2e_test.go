package server

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// countApplies is the lab's Backend counting the server's Apply calls.
type countApplies struct {
	*pinhole.Backend
	n atomic.Int64
}

func (c *countApplies) Apply(ops []pinhole.Op) error {
	c.n.Add(1)
	return c.Backend.Apply(ops)
}

// TestE2EAuditCutsBackLongerTimeouts (h/auditrem; review h/revsnat
// finding 4): with the watch off (as when deaf), live leases' elements
// are re-added by hand (one nft transaction) with a day's timeout or with
// none: an IPv6 pinhole (pin6, 1d in place), a filtered one (pin6_filter,
// deleted and added without timeout), a NAPT mapping's map element and
// SNAT companion (both without timeout), and another mapping's companion
// alone (1d), a redirect (redir6, c:8445 -> c:445, 1d in place). One audit cuts every one back: the kernel holds each part
// no longer than its lease's remaining lifetime (1 h) and every element
// is still there, traffic passing. An audit of the intact table, before
// and after, applies nothing. Before, the audit ignored the elements'
// timeouts: each kept its day, or lived for ever.
func TestE2EAuditCutsBackLongerTimeouts(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	l.stop()
	fw := &countApplies{Backend: l.fw}
	l.firewall = fw
	l.start()
	c, c4, pub := l.topo.ClientV6, l.topo.ClientV4, l.topo.HostPublicV4
	wide := netip.PrefixFrom(l.topo.InternetV6, 64).Masked()
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	var holes []pinhole.Pinhole
	for i, r := range []*pcp.Request{
		mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1),
		mapFiltered(c, 444, 0, wide, 2),
		mapReq(c4, pcp.ProtoTCP, 9090, 19090, time.Hour, 3),
		mapReq(c4, pcp.ProtoTCP, 9091, 19091, time.Hour, 4),
		mapReq(c, pcp.ProtoTCP, 445, 8445, time.Hour, 5),
	} {
		resp := l.pcp(r)
		if resp.Result != pcp.Success {
			t.Fatalf("MAP %d: %+v", i, resp)
		}
		p := pinhole.Pinhole{Protocol: 6, InternalAddr: r.ClientAddr, InternalPort: r.Map.InternalPort,
			ExternalAddr: resp.Map.ExternalAddr, ExternalPort: resp.Map.ExternalPort}
		if len(r.Options.Filters) > 0 {
			p.RemotePrefix = wide
		}
		cp, err := p.Canonical()
		if err != nil {
			t.Fatal(err)
		}
		holes = append(holes, cp)
	}
	if holes[2].ExternalPort != 19090 || holes[3].ExternalPort != 19091 || holes[4].ExternalPort != 8445 {
		t.Fatalf("ports %d, %d, %d, want 19090, 19091, 8445", holes[2].ExternalPort, holes[3].ExternalPort, holes[4].ExternalPort)
	}
	svc6, svc4 := netip.AddrPortFrom(c, 443), netip.AddrPortFrom(pub, 19090)
	if !l.reach(svc6) || !l.reach(svc4) {
		t.Fatal("mappings pass no traffic before any change")
	}
	audit := func(what string) int64 {
		before := fw.n.Load()
		l.srv.auditFirewall(context.Background())
		return fw.n.Load() - before
	}
	if n := audit("intact"); n != 0 {
		t.Errorf("an audit of the intact table applied %d transactions, want 0", n)
	}
	script := fmt.Sprintf("add element inet pcpd pin6 { %s . tcp . 443 timeout 1d }\n", c) +
		fmt.Sprintf("delete element inet pcpd pin6_filter { %s . tcp . 444 . %s . 0-65535 }\n", c, wide) +
		fmt.Sprintf("add element inet pcpd pin6_filter { %s . tcp . 444 . %s . 0-65535 }\n", c, wide) +
		fmt.Sprintf("delete element inet pcpd napt4 { %s . tcp . 19090 }\n", pub) +
		fmt.Sprintf("add element inet pcpd napt4 { %s . tcp . 19090 : %s . 9090 }\n", pub, c4) +
		fmt.Sprintf("delete element inet pcpd snat4 { %s . tcp . 9090 }\n", c4) +
		fmt.Sprintf("add element inet pcpd snat4 { %s . tcp . 9090 : %s . 19090 }\n", c4, pub) +
		fmt.Sprintf("add element inet pcpd snat4 { %s . tcp . 9091 timeout 1d : %s . 19091 }\n", c4, pub) +
		fmt.Sprintf("add element inet pcpd redir6 { %s . tcp . 8445 timeout 1d : %s . 445 }\n", c, c)
	l.topo.Host.MustRun(t, "sh", "-c", "nft -f - <<'EOF'\n"+script+"EOF\n")
	// The kernel's view, read as the audit reads it, and the SNAT
	// companions' as nft lists them (apart from List).
	longest := func() map[pinhole.Pinhole]string {
		got := make(map[pinhole.Pinhole]string)
		snat := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4")
		for _, e := range l.kernelHoles() {
			left, ok := e.Longest()
			if p := e.Pinhole; ok && p.InternalAddr.Is4() {
				var held bool
				var comp time.Duration
				comp, ok, held = nftExpires(t, snat, fmt.Sprintf("%s . tcp . %d ", p.InternalAddr, p.InternalPort))
				if !held {
					got[p] = "no companion"
					continue
				}
				left = max(left, comp)
			}
			if !ok {
				got[e.Pinhole] = "none"
			} else if left > time.Hour+time.Second {
				got[e.Pinhole] = left.Round(time.Second).String()
			} else {
				got[e.Pinhole] = ""
			}
		}
		return got
	}
	k := longest()
	for _, p := range holes {
		if left, ok := k[p]; !ok || left == "" {
			t.Fatalf("%v: not re-added longer by hand (%q, %v): the test proves nothing", p, left, ok)
		}
	}
	if n := audit("re-added longer"); n == 0 {
		t.Errorf("the audit applied nothing")
	}
	k = longest()
	for _, p := range holes {
		left, ok := k[p]
		switch {
		case !ok:
			t.Errorf("%v: gone after the audit (its lease is live)", p)
		case left != "":
			t.Errorf("%v: the kernel holds it (or its SNAT companion) for %s after the audit, beyond its lease (1 h)", p, left)
		}
	}
	for _, e := range l.kernelHoles() {
		if left, ok := e.Longest(); ok && left < 50*time.Minute {
			t.Errorf("%v: cut back to %v, below its lease", e.Pinhole, left)
		}
	}
	if !l.reach(svc6) || !l.reach(svc4) {
		t.Error("mappings pass no traffic after the audit")
	}
	if n := audit("after"); n != 0 {
		t.Errorf("an audit after the cut-back applied %d transactions, want 0", n)
	}
}

var nftExpiresRe = regexp.MustCompile(`expires ((?:\d+ms|\d+[dhms])+)`)

// nftExpires reads, in nft's listing of a set or map, the element whose
// line holds key: its remaining time (ok false: it has none) and whether
// it is listed.
func nftExpires(t *testing.T, listing, key string) (left time.Duration, ok, held bool) {
	t.Helper()
	for _, line := range strings.Split(listing, "\n") {
		i := strings.Index(line, key)
		if i < 0 {
			continue
		}
		line = line[i:]
		if end := strings.IndexAny(line, ",}"); end >= 0 {
			line = line[:end]
		}
		m := nftExpiresRe.FindStringSubmatch(line)
		if m == nil {
			return 0, false, true
		}
		for _, part := range regexp.MustCompile(`(\d+)(ms|[dhms])`).FindAllStringSubmatch(m[1], -1) {
			n, err := strconv.Atoi(part[1])
			if err != nil {
				t.Fatal(err)
			}
			unit := map[string]time.Duration{"d": 24 * time.Hour, "h": time.Hour, "m": time.Minute, "s": time.Second, "ms": time.Millisecond}[part[2]]
			left += time.Duration(n) * unit
		}
		return left, true, true
	}
	return 0, false, false
}

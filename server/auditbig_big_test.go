package server

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// errNoElement: the kernel holds no such element (ENOENT).
var errNoElement = errors.New("no such element")

// pin6Left asks the kernel, in the namespace of handle ns, for the element
// a . tcp . port of pcpd's pin6 set with one GETSETELEM each (no dump:
// `nft get element` took minutes over 250 000 elements here), and returns
// when each one ends: its remaining time (NFTA_SET_ELEM_EXPIRATION) from
// the moment its reply was read (a bound from above: the kernel measured
// a little before), or errNoElement.
func pin6Ends(ns int, addrs []netip.Addr, port uint16) ([]time.Time, []error, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: ns})
	if err != nil {
		return nil, nil, err
	}
	defer c.Close()
	ends := make([]time.Time, len(addrs))
	errs := make([]error, len(addrs))
	for i, a := range addrs {
		key := make([]byte, 24) // ipv6_addr . inet_proto . inet_service, each in 4-byte registers
		a16 := a.As16()
		copy(key, a16[:])
		key[16] = unix.IPPROTO_TCP
		binary.BigEndian.PutUint16(key[20:], port)
		ae := netlink.NewAttributeEncoder()
		ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, "pcpd")
		ae.String(unix.NFTA_SET_ELEM_LIST_SET, "pin6")
		ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(ae *netlink.AttributeEncoder) error {
			ae.Nested(unix.NFTA_LIST_ELEM, func(ae *netlink.AttributeEncoder) error {
				ae.Nested(unix.NFTA_SET_ELEM_KEY, func(ae *netlink.AttributeEncoder) error {
					ae.Bytes(unix.NFTA_DATA_VALUE, key)
					return nil
				})
				return nil
			})
			return nil
		})
		attrs, err := ae.Encode()
		if err != nil {
			return nil, nil, err
		}
		msgs, err := c.Execute(netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETSETELEM), Flags: netlink.Request}, // no ACK: the reply is the element, or an error
			Data:   append([]byte{unix.NFPROTO_INET, 0, 0, 0}, attrs...),
		})
		replied := time.Now()
		if errors.Is(err, unix.ENOENT) {
			errs[i] = errNoElement
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("get %s: %w", a, err)
		}
		errs[i] = fmt.Errorf("%s: no expiration in the reply", a)
		for _, m := range msgs {
			if len(m.Data) < 4 {
				continue
			}
			ad, err := netlink.NewAttributeDecoder(m.Data[4:])
			if err != nil {
				return nil, nil, err
			}
			for ad.Next() {
				if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
					continue
				}
				ad.Nested(func(ad *netlink.AttributeDecoder) error {
					for ad.Next() {
						ad.Nested(func(ad *netlink.AttributeDecoder) error {
							for ad.Next() {
								if ad.Type() == unix.NFTA_SET_ELEM_EXPIRATION {
									ends[i] = replied.Add(time.Duration(binary.BigEndian.Uint64(ad.Bytes())) * time.Millisecond)
									errs[i] = nil
								}
							}
							return nil
						})
					}
					return nil
				})
			}
			if err := ad.Err(); err != nil {
				return nil, nil, err
			}
		}
	}
	return ends, errs, nil
}

// TestAuditAboveMaxBig (h/bigaudit; root: a real kernel in a namespace of
// its own and a real store; PCPD_AUDIT_BIG=N, above auditMaxLeases: the
// threshold as pcpd runs it) starts a server over N stored leases (the
// start installs their pinholes), deletes 1 000 of their pin6 elements by
// hand (one `nft -f`, no watch running), runs the audit and reads those
// elements back with `nft get element` (a per-element GET, no dump): all
// are back, none with more than its lease's remaining lifetime. Logs the
// whole audit's time and the longest wait of a probe taking s.mu every
// millisecond meanwhile (a figure: run it under the bench lock). On main
// (the audit skipped above auditMaxLeases) it fails: 'deleted elements not
// back'. PCPD_AUDIT_BIG_CONFLICTS=G (h/watchleft) adds G runs of 6
// leases whose Installs the kernel refuses as conflicts (below): the
// logged longest hold of s.mu then includes a step's conflict retries.
func TestAuditAboveMaxBig(t *testing.T) {
	netlab.RequireRoot(t)
	n, _ := strconv.Atoi(os.Getenv("PCPD_AUDIT_BIG"))
	if n == 0 {
		t.Skip("PCPD_AUDIT_BIG=N not set")
	}
	if n <= auditMaxLeases {
		t.Fatalf("PCPD_AUDIT_BIG=%d: want more than auditMaxLeases (%d)", n, auditMaxLeases)
	}
	const k = 1000
	dir := t.TempDir()
	// PCPD_AUDIT_BIG_CONFLICTS=G (h/watchleft): G runs of 6 neighbouring
	// leases are filtered MAPs (from 2001:db8:99::/48) whose elements are
	// replaced by hand with wider ones (from ::/0): the audit's Install of
	// each is refused as a conflict (the kernel refuses an element that
	// starts inside another), 6 in a step: a step's retries
	// (auditConflictRetries) and its longest hold of s.mu.
	groups, _ := strconv.Atoi(os.Getenv("PCPD_AUDIT_BIG_CONFLICTS"))
	const perGroup = 6
	ls := startLeases(n, time.Now())
	var conflicting []store.Key
	for g := range groups {
		for j := range perGroup {
			i := g*(n/max(groups, 1)) + 100 + j
			ls[i].Filters = []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8:99::/48")}}
			conflicting = append(conflicting, ls[i].Key)
		}
	}
	commitLeases(t, dir, ls)
	var picked []store.Key
	for i := range k {
		picked = append(picked, ls[i*(n/k)].Key)
	}
	ls = nil
	st, state, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ns := netlab.NewNS(t, "bigaudit-big")
	conn, _ := ns.LastingNftConn(t)
	fw, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	s := benchServerCfg(t, fw, st, state, Config{})
	t.Logf("start over %d leases: %v", n, time.Since(t1))

	elems := make([]string, len(picked))
	for i, key := range picked {
		elems[i] = fmt.Sprintf("%s . tcp . 443", key.InternalAddr)
	}
	set := "{ " + strings.Join(elems, ", ") + " }"
	script := filepath.Join(t.TempDir(), "del.nft")
	body := "delete element inet pcpd pin6 " + set + "\n"
	for _, key := range conflicting {
		body += fmt.Sprintf("delete element inet pcpd pin6_filter { %s . tcp . 443 . 2001:db8:99::/48 . 0-65535 }\nadd element inet pcpd pin6_filter { %s . tcp . 443 . ::/0 . 0-65535 timeout 1h }\n", key.InternalAddr, key.InternalAddr)
	}
	if err := os.WriteFile(script, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if nsh, err := ns.Handle(); err != nil {
		t.Fatal(err)
	} else if ends, errs, err := pin6Ends(int(nsh), []netip.Addr{picked[0].InternalAddr}, 443); err != nil || errs[0] != nil || time.Until(ends[0]) > time.Hour {
		t.Fatalf("before the delete: %v %v %v, want the element with ≤ 1h left", ends, errs, err)
	}
	ns.MustRun(t, "nft", "-f", script)
	if nsh, err := ns.Handle(); err != nil {
		t.Fatal(err)
	} else if _, errs, err := pin6Ends(int(nsh), []netip.Addr{picked[0].InternalAddr, picked[1].InternalAddr}, 443); err != nil || !errors.Is(errs[0], errNoElement) || !errors.Is(errs[1], errNoElement) {
		t.Fatalf("after nft delete element: %v %v, want both gone", errs, err)
	}

	core, logs := observer.New(zap.InfoLevel)
	s.log = zap.New(core) // nothing runs beside: no Serve
	type holdAt struct {
		d        time.Duration
		conflict bool
	}
	var top []holdAt // the 5 longest holds of s.mu
	auditHoldHook = func(d time.Duration, conflict bool) {
		top = append(top, holdAt{d, conflict})
		slices.SortFunc(top, func(a, b holdAt) int { return cmp.Compare(b.d, a.d) })
		top = top[:min(len(top), 5)]
	}
	defer func() { auditHoldHook = nil }()
	endProbe := probeLockWait(s)
	t0 := time.Now()
	s.auditFirewall(context.Background())
	took := time.Since(t0)
	maxWait, probes := endProbe()
	auditHoldHook = nil
	t.Logf("longest holds of s.mu (conflict refused in it): %+v", top)
	t.Logf("audit over %d leases (threshold %d): %v; engine's longest wait for s.mu %v (%d probes)", n, auditMaxLeases, took, maxWait, probes)
	for _, e := range logs.All() {
		if e.Level == zap.WarnLevel && strings.Contains(e.Message, "another mapping") {
			continue // one per conflict
		}
		t.Logf("log: %s %v", e.Message, e.ContextMap())
		if c, ok := e.ContextMap()["conflicts"]; ok && fmt.Sprint(c) != fmt.Sprint(len(conflicting)) {
			t.Errorf("the audit met %v conflicts, want %d (the elements replaced by hand)", c, len(conflicting))
		}
	}

	s.mu.Lock()
	expires := make([]time.Time, len(picked))
	for i, key := range picked {
		l, ok := s.tab.get(key)
		if !ok {
			s.mu.Unlock()
			t.Fatalf("lease %v gone", key)
		}
		expires[i] = l.Expires
	}
	s.mu.Unlock()
	nsh, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	addrs := make([]netip.Addr, len(picked))
	for i, key := range picked {
		addrs[i] = key.InternalAddr
	}
	ends, errs, err := pin6Ends(int(nsh), addrs, 443)
	if err != nil {
		t.Fatal(err)
	}
	missing := 0
	var first, last time.Time
	over := -time.Hour
	for i, end := range ends {
		if errs[i] != nil {
			if !errors.Is(errs[i], errNoElement) {
				t.Fatal(errs[i])
			}
			missing++
			continue
		}
		// The kernel counts in jiffies from its commit, a little after
		// the audit read its clock.
		// The kernel counts in jiffies (msecs_to_jiffies rounds up)
		// from its commit, a little after the audit read its clock.
		if end.After(expires[i].Add(20 * time.Millisecond)) {
			t.Errorf("%s: the kernel ends it at %v, after its lease (%v)", addrs[i], end, expires[i])
		}
		over = max(over, end.Sub(expires[i]))
		if first.IsZero() || end.Before(first) {
			first = end
		}
		if last.IsZero() || end.After(last) {
			last = end
		}
	}
	if missing > 0 {
		t.Fatalf("deleted elements not back: %d of %d after the audit over %d leases (threshold %d)", missing, k, n, auditMaxLeases)
	}
	t.Logf("all %d deleted elements back, ending %v-%v after the read; the latest relative to its lease's expiry: %+v", k, time.Until(first), time.Until(last), over)
}

package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/store"
)

// table is an in-memory Backend: the protocol under test is the socket's,
// not the engine's (the lab test drives the real engine through it).
type table struct {
	mu     sync.Mutex
	leases []store.Lease
	status Status
}

func (t *table) Leases() []store.Lease {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]store.Lease(nil), t.leases...)
}

func (t *table) Status() Status { return t.status }

// StreamLeases lists a copy of the leases, as they are sorted.
func (t *table) StreamLeases(count func(int) error, each func(*store.Lease) error) error {
	ls := t.Leases()
	if err := count(len(ls)); err != nil {
		return err
	}
	for i := range ls {
		if err := each(&ls[i]); err != nil {
			return err
		}
	}
	return nil
}

func (t *table) HasOwner(id string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.ContainsFunc(t.leases, func(l store.Lease) bool { return l.Owner == id })
}

func (t *table) Revoke(_ context.Context, r Revoke) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var keep []store.Lease
	n := 0
	for _, l := range t.leases {
		if r.All || (r.Owner != "" && l.Owner == r.Owner) || (r.Key != nil && l.Key == *r.Key) ||
			slices.Contains(r.Opens, Opening{Protocol: l.Protocol, InternalAddr: l.InternalAddr.Unmap(), InternalPort: l.InternalPort}) {
			n++
			continue
		}
		keep = append(keep, l)
	}
	t.leases = keep
	return n, nil
}

var t0 = time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)

func lease(owner string, proto uint8, addr string, port uint16) store.Lease {
	a := netip.MustParseAddr(addr)
	return store.Lease{
		Key:          store.Key{Owner: owner, Protocol: proto, InternalAddr: a, InternalPort: port},
		Kind:         store.KindMap,
		ExternalAddr: a, ExternalPort: port,
		Created: t0, Expires: t0.Add(time.Hour + 500*time.Millisecond),
	}
}

func start(t *testing.T, b Backend) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "pcpd.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, b, zap.NewNop()) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket left behind after Serve returned: %v", err)
		}
	})
	return path
}

func TestSocketModes(t *testing.T) {
	path := start(t, &table{})
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want socket 0600", fi.Mode())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v, want 0700", di.Mode().Perm())
	}
}

func TestStaleSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "pcpd.sock")

	t.Run("stale file from a killed daemon is replaced", func(t *testing.T) {
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		ln.SetUnlinkOnClose(false) // what kill -9 leaves behind
		ln.Close()
		if _, err := os.Lstat(path); err != nil {
			t.Fatalf("setup: %v", err)
		}
		ln2, err := Listen(path)
		if err != nil {
			t.Fatalf("Listen over a stale socket: %v", err)
		}
		ln2.Close()
	})

	t.Run("live daemon is not displaced", func(t *testing.T) {
		ln, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		_, err = Listen(path)
		if !errors.Is(err, ErrInUse) {
			t.Fatalf("second Listen: %v, want ErrInUse", err)
		}
		if _, err := os.Lstat(path); err != nil {
			t.Fatalf("live socket removed: %v", err)
		}
	})

	t.Run("a regular file is never removed", func(t *testing.T) {
		f := filepath.Join(dir, "notasocket")
		if err := os.WriteFile(f, []byte("keep"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Listen(f); !errors.Is(err, ErrNotSocket) {
			t.Fatalf("Listen on a file: %v, want ErrNotSocket", err)
		}
		if b, _ := os.ReadFile(f); string(b) != "keep" {
			t.Fatal("file was touched")
		}
	})
}

func TestLeasesAndStatus(t *testing.T) {
	peer := lease("peerkey=", 17, "2001:db8:1:2::10", 5000)
	peer.Kind = store.KindPeer
	peer.Remote = netip.MustParseAddrPort("[2001:db8:99::1]:4000")
	peer.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8:99::/48")}, {Prefix: netip.MustParsePrefix("2001:db8:98::/48"), Port: 80}}
	peer.Description = "game"
	b := &table{
		leases: []store.Lease{lease("home", 6, "2001:db8:1:2::10", 443), peer},
		status: Status{PID: 42, Epoch: 7, Leases: 2, Owners: 1, OwnershipSource: "wireguard:wg0", Listen: []string{"[2001:db8:1::1]:5351"}, Started: t0},
	}
	c := &Client{Path: start(t, b)}
	var got []Lease
	n, err := c.Leases(context.Background(), func(l Lease) error { got = append(got, l); return nil })
	if err != nil || n != 2 {
		t.Fatalf("Leases: %d, %v", n, err)
	}
	want := []Lease{
		{Client: "home", Kind: "map", Protocol: "tcp",
			InternalAddress: netip.MustParseAddr("2001:db8:1:2::10"), InternalPort: 443,
			ExternalAddress: netip.MustParseAddr("2001:db8:1:2::10"), ExternalPort: 443,
			CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		{Client: "peerkey=", Kind: "peer", Protocol: "udp",
			InternalAddress: netip.MustParseAddr("2001:db8:1:2::10"), InternalPort: 5000,
			ExternalAddress: netip.MustParseAddr("2001:db8:1:2::10"), ExternalPort: 5000,
			Remote: "[2001:db8:99::1]:4000", Filters: []string{"2001:db8:99::/48", "[2001:db8:98::/48]:80"},
			Description: "game", CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)},
	}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Fatalf("leases (-want +got):\n%s", diff)
	}
	st, err := c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(b.status, st); diff != "" {
		t.Fatalf("status (-want +got):\n%s", diff)
	}
}

// The JSON a script sees: field names DESIGN.md promises, RFC 3339 times.
func TestLeaseJSONFields(t *testing.T) {
	b, err := json.Marshal(LeaseFrom(lease("home", 6, "2001:db8:1:2::10", 443)))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]any{
		"client": "home", "protocol": "tcp", "internal_address": "2001:db8:1:2::10", "internal_port": 443.0,
		"external_address": "2001:db8:1:2::10", "external_port": 443.0, "expires_at": "2026-11-23T11:00:00Z",
	} {
		if m[k] != v {
			t.Errorf("%s = %v, want %v (%s)", k, m[k], v, b)
		}
	}
}

func TestRevoke(t *testing.T) {
	tests := []struct {
		name string
		req  Request
		n    int
		left int
	}{
		{"all", Request{All: true}, 4, 0},
		{"client", Request{Client: "a"}, 2, 2},
		{"client with prefix", Request{Client: "wg:key="}, 1, 3},
		{"unknown client", Request{Client: "nobody"}, 0, 4},
		{"client without its prefix", Request{Client: "key="}, 1, 3},
		{"by what it opens, any owner", Request{Leases: []LeaseRef{{Protocol: "tcp", InternalAddress: netip.MustParseAddr("2001:db8:1::1"), InternalPort: 80}}}, 1, 3},
		{"several", Request{Leases: []LeaseRef{
			{Protocol: "tcp", InternalAddress: netip.MustParseAddr("2001:db8:1::1"), InternalPort: 80},
			{Protocol: "udp", InternalAddress: netip.MustParseAddr("2001:db8:2::1"), InternalPort: 53}}}, 2, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &table{leases: []store.Lease{
				lease("a", 6, "2001:db8:1::1", 80), lease("a", 17, "2001:db8:1::1", 80),
				lease("b", 6, "2001:db8:2::1", 80), lease("wg:key=", 17, "2001:db8:2::1", 53),
			}}
			c := &Client{Path: start(t, b)}
			n, err := c.Revoke(context.Background(), tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if n != tt.n || len(b.Leases()) != tt.left {
				t.Fatalf("revoked %d (want %d), %d left (want %d)", n, tt.n, len(b.Leases()), tt.left)
			}
		})
	}
}

// Malformed requests get a coded error, and the connection stays usable.
func TestBadRequests(t *testing.T) {
	path := start(t, &table{})
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(conn)
	for _, tt := range []struct{ line, code string }{
		{`not json`, CodeBadRequest},
		{`{"op":"leases","bogus":1}`, CodeBadRequest},
		{`{"op":"reboot"}`, CodeUnknownOp},
		{`{"op":"revoke"}`, CodeBadRequest},
		{`{"op":"revoke","all":true,"client":"a"}`, CodeBadRequest},
		{`{"op":"revoke","leases":[{"protocol":"sctpish","internal_address":"2001:db8::1","internal_port":1}]}`, CodeBadRequest},
	} {
		fmt.Fprintln(conn, tt.line)
		line, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("%s: %v", tt.line, err)
		}
		var rep Reply
		if err := json.Unmarshal(line, &rep); err != nil {
			t.Fatal(err)
		}
		if rep.OK || rep.Error == nil || rep.Error.Code != tt.code {
			t.Errorf("%s → %s, want code %s", tt.line, line, tt.code)
		}
	}
	fmt.Fprintln(conn, `{"op":"status"}`)
	line, _ := r.ReadBytes('\n')
	var rep Reply
	if json.Unmarshal(line, &rep) != nil || !rep.OK {
		t.Fatalf("status after errors: %s", line)
	}
}

func TestRemoteError(t *testing.T) {
	c := &Client{Path: filepath.Join(t.TempDir(), "absent.sock")}
	if _, err := c.Status(context.Background()); err == nil {
		t.Fatal("status from a missing socket succeeded")
	}
}

func TestParseLeaseRef(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want LeaseRef
		err  bool
	}{
		{in: "tcp/2001:db8:1:2::10/443", want: LeaseRef{"tcp", netip.MustParseAddr("2001:db8:1:2::10"), 443}},
		{in: "UDP/10.100.0.2/53", want: LeaseRef{"udp", netip.MustParseAddr("10.100.0.2"), 53}},
		{in: "6/10.100.0.2/80", want: LeaseRef{"tcp", netip.MustParseAddr("10.100.0.2"), 80}},
		{in: "tcp/2001:db8::1", err: true},
		{in: "tcp/host/80", err: true},
		{in: "tcp/2001:db8::1/99999", err: true},
		{in: "quic/2001:db8::1/443", err: true},
	} {
		got, err := ParseLeaseRef(tt.in)
		if (err != nil) != tt.err || (!tt.err && got != tt.want) {
			t.Errorf("ParseLeaseRef(%q) = %v, %v", tt.in, got, err)
		}
	}
}

// 100 000 leases stream through the socket, every one of them. How fast
// is a benchmark's question, not a test's (BENCHMARKS.md: `pcpd leases
// --json` at 100 000 and 1 000 000 leases, bench/run); the time is logged.
func TestManyLeases(t *testing.T) {
	b := &table{}
	for i := 0; i < 100_000; i++ {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 14: byte(i >> 8), 15: byte(i)})
		b.leases = append(b.leases, lease(fmt.Sprintf("client%d", i%500), 6, a.String(), uint16(1024+i%60000)))
	}
	c := &Client{Path: start(t, b)}
	begin := time.Now()
	n, err := c.Leases(context.Background(), func(Lease) error { return nil })
	took := time.Since(begin)
	if err != nil || n != 100_000 {
		t.Fatalf("Leases: %d, %v", n, err)
	}
	t.Logf("100000 leases over the socket in %v", took)
}

// The hand-written encoder the daemon streams with says exactly what
// encoding/json says of the Lease type clients decode into.
func TestAppendLeaseJSON(t *testing.T) {
	full := lease("wg:abc+/=", 17, "2001:db8:1:2::10", 5000)
	full.Kind = store.KindPeer
	full.Remote = netip.MustParseAddrPort("[2001:db8:99::1]:4000")
	full.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8:99::/48")}, {Prefix: netip.MustParsePrefix("192.0.2.0/24"), Port: 80}}
	full.ThirdParty = true
	full.Created = time.Date(2026, 1, 2, 3, 4, 5, 999, time.FixedZone("x", 3600))
	for _, l := range []store.Lease{
		lease("static:home", 6, "10.100.0.2", 80),
		full,
		func() store.Lease {
			l := full
			l.Description = "quote \" backslash \\ tab \t <html> & é 中 \u2028"
			return l
		}(),
		func() store.Lease { l := full; l.Description = "bad utf-8 \xff"; return l }(),
		func() store.Lease { l := full; l.Protocol = 132; l.ExternalAddr = netip.Addr{}; return l }(),
	} {
		want, err := json.Marshal(LeaseFrom(l))
		if err != nil {
			t.Fatal(err)
		}
		got := appendLeaseJSON(nil, &l)
		if string(got) != string(want) {
			t.Errorf("appendLeaseJSON:\n got %s\nwant %s", got, want)
		}
	}
}

// streamer is a Backend whose listing fails after its first lease when
// fail is set.
type streamer struct {
	*table
	fail error // returned by each after the first lease
}

func (s *streamer) StreamLeases(count func(int) error, each func(*store.Lease) error) error {
	ls := s.table.Leases()
	if err := count(len(ls)); err != nil {
		return err
	}
	var l store.Lease // reused, as the engine does
	for i := range ls {
		if i > 0 && s.fail != nil {
			return s.fail
		}
		l = ls[i]
		if err := each(&l); err != nil {
			return err
		}
	}
	return nil
}

// A backend that streams gives the same lines as one that returns a slice;
// a stream cut short is an error at the client, not a short list.
func TestLeasesStreamed(t *testing.T) {
	ls := []store.Lease{lease("home", 6, "2001:db8:1:2::10", 443), lease("home", 17, "2001:db8:1:2::11", 53), lease("work", 6, "2001:db8:1:3::1", 22)}
	tests := []struct {
		name    string
		fail    error
		wantErr bool
	}{
		{"whole", nil, false},
		{"cut short", errors.New("engine gave up"), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			plain := &Client{Path: start(t, &table{leases: ls})}
			streamed := &Client{Path: start(t, &streamer{table: &table{leases: ls}, fail: tc.fail})}
			var want, got []string
			if _, err := plain.LeasesJSON(context.Background(), func(l []byte) error { want = append(want, string(l)); return nil }); err != nil {
				t.Fatal(err)
			}
			n, err := streamed.LeasesJSON(context.Background(), func(l []byte) error { got = append(got, string(l)); return nil })
			if tc.wantErr {
				if err == nil || !errors.Is(err, ErrProtocol) {
					t.Fatalf("cut-short stream: %d leases, err %v", n, err)
				}
				return
			}
			if err != nil || n != len(ls) || !slices.Equal(got, want) {
				t.Fatalf("streamed %d %v:\n%q\nwant\n%q", n, err, got, want)
			}
		})
	}
}

// TestSocketDirectoryTrusted: Listen refuses a socket directory another
// user could change (review h/revctl). Whoever may rename or unlink
// entries in the directory (its owner, or anyone when it is group- or
// world-writable, sticky or not: the path can be bound before pcpd) can
// put a socket of their own in place of pcpd's, so that `pcpd revoke` run
// by the operator talks to them and is told it worked, or swap the fresh
// socket for a symlink between bind and chmod and have pcpd chmod any
// file 0600. An ancestor is as dangerous unless sticky (/tmp): it lets
// the directory itself be renamed away.
func TestSocketDirectoryTrusted(t *testing.T) {
	const other = 65534 // nobody
	root := os.Geteuid() == 0
	type setup func(t *testing.T, base string) string // returns the socket path
	mk := func(t *testing.T, dir string, mode os.FileMode, uid int) {
		t.Helper()
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		if uid >= 0 {
			if err := os.Chown(dir, uid, -1); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tc := range []struct {
		name      string
		needsRoot bool
		setup     setup
		ok        bool
	}{
		{"own 0700 directory", false, func(t *testing.T, b string) string {
			mk(t, b+"/run", 0o700, -1)
			return b + "/run/pcpd.sock"
		}, true},
		{"own 0755 directory", false, func(t *testing.T, b string) string {
			mk(t, b+"/run", 0o755, -1)
			return b + "/run/pcpd.sock"
		}, true},
		{"created by Listen", false, func(t *testing.T, b string) string {
			return b + "/new/run/pcpd.sock"
		}, true},
		{"own directory under a sticky world-writable parent (/tmp)", false, func(t *testing.T, b string) string {
			mk(t, b+"/tmp", os.ModeSticky|0o777, -1)
			mk(t, b+"/tmp/run", 0o700, -1)
			return b + "/tmp/run/pcpd.sock"
		}, true},
		{"through a symlink to an own directory", false, func(t *testing.T, b string) string {
			mk(t, b+"/real", 0o700, -1)
			if err := os.Symlink(b+"/real", b+"/link"); err != nil {
				t.Fatal(err)
			}
			return b + "/link/pcpd.sock"
		}, true},
		{"world-writable directory", false, func(t *testing.T, b string) string {
			mk(t, b+"/run", 0o777, -1)
			return b + "/run/pcpd.sock"
		}, false},
		{"group-writable directory", false, func(t *testing.T, b string) string {
			mk(t, b+"/run", 0o770, -1)
			return b + "/run/pcpd.sock"
		}, false},
		{"sticky world-writable directory (socket straight in /tmp)", false, func(t *testing.T, b string) string {
			mk(t, b+"/tmp", os.ModeSticky|0o777, -1)
			return b + "/tmp/pcpd.sock"
		}, false},
		{"world-writable parent, not sticky", false, func(t *testing.T, b string) string {
			mk(t, b+"/pub", 0o777, -1)
			mk(t, b+"/pub/run", 0o700, -1)
			return b + "/pub/run/pcpd.sock"
		}, false},
		{"directory owned by another user", true, func(t *testing.T, b string) string {
			mk(t, b+"/run", 0o700, other)
			return b + "/run/pcpd.sock"
		}, false},
		{"parent owned by another user", true, func(t *testing.T, b string) string {
			mk(t, b+"/home", 0o755, other)
			mk(t, b+"/home/run", 0o700, -1)
			return b + "/home/run/pcpd.sock"
		}, false},
		{"symlink to a directory owned by another user", true, func(t *testing.T, b string) string {
			mk(t, b+"/theirs", 0o700, other)
			if err := os.Symlink(b+"/theirs", b+"/link"); err != nil {
				t.Fatal(err)
			}
			return b + "/link/pcpd.sock"
		}, false},
		// Review h/revfsperm: the three rows below passed before. The
		// symlink's owner can re-point it at their own directory and
		// socket once pcpd is listening (every `pcpd status` resolves
		// the path again); the missing directories were created first,
		// as root, wherever the path led, and checked after.
		{"another user's symlink in a sticky directory, to an own directory", true, func(t *testing.T, b string) string {
			mk(t, b+"/tmp", os.ModeSticky|0o777, -1)
			mk(t, b+"/run", 0o700, -1)
			if err := os.Symlink(b+"/run", b+"/tmp/pcpd"); err != nil {
				t.Fatal(err)
			}
			if err := os.Lchown(b+"/tmp/pcpd", other, -1); err != nil {
				t.Fatal(err)
			}
			return b + "/tmp/pcpd/pcpd.sock"
		}, false},
		{"own symlink in a world-writable directory, to an own directory", false, func(t *testing.T, b string) string {
			mk(t, b+"/pub", 0o777, -1)
			mk(t, b+"/run", 0o700, -1)
			if err := os.Symlink(b+"/run", b+"/pub/pcpd"); err != nil {
				t.Fatal(err)
			}
			return b + "/pub/pcpd/pcpd.sock"
		}, false},
		{"missing directories under another user's", true, func(t *testing.T, b string) string {
			mk(t, b+"/home", 0o755, other)
			return b + "/home/new/run/pcpd.sock"
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needsRoot && !root {
				t.Skip("needs root to chown")
			}
			base := t.TempDir()
			path := tc.setup(t, base)
			_, dirErr := os.Lstat(filepath.Dir(path))
			ln, err := Listen(path)
			if tc.ok {
				if err != nil {
					t.Fatalf("Listen: %v", err)
				}
				ln.Close()
				return
			}
			if err == nil {
				ln.Close()
				t.Fatalf("Listen in an untrusted directory succeeded, want ErrUnsafeDir")
			}
			if !errors.Is(err, ErrUnsafeDir) {
				t.Fatalf("Listen: %v, want ErrUnsafeDir", err)
			}
			if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("refused Listen left something at the path: %v", err)
			}
			if _, err := os.Lstat(filepath.Dir(path)); errors.Is(dirErr, os.ErrNotExist) && err == nil {
				t.Errorf("refused Listen created the socket's directory %s", filepath.Dir(path))
			}
		})
	}
}

// TestListenDotDot (review h/revfsperm2): the directory checked is the
// one the socket is bound in. On main Listen checked filepath.Dir(path),
// which takes ".." lexically, while bind takes it after the symlink
// before it, as the kernel does: run/link/../pcpd.sock passed with run
// trusted and was bound in the world-writable directory link's target is
// in. (pcpd's config cleans --socket; Listen's other callers did not.)
func TestListenDotDot(t *testing.T) {
	for _, tc := range []struct {
		name   string
		target string // of run/link, under the test's directory
	}{
		{"symlink into an own directory", "own/sub"},
		{"symlink into a world-writable directory", "pub/sub"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := t.TempDir()
			for d, mode := range map[string]os.FileMode{"run": 0o700, "own/sub": 0o700, "pub/sub": 0o700} {
				if err := os.MkdirAll(filepath.Join(b, d), mode); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Chmod(filepath.Join(b, "pub"), 0o777); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(filepath.Join(b, tc.target), filepath.Join(b, "run", "link")); err != nil {
				t.Fatal(err)
			}
			ln, err := Listen(b + "/run/link/../pcpd.sock")
			if err == nil {
				defer ln.Close()
			} else if !errors.Is(err, ErrUnsafeDir) {
				t.Fatalf("Listen: %v", err)
			}
			if _, err := os.Lstat(filepath.Join(b, "pub", "pcpd.sock")); err == nil {
				t.Fatal("the socket was bound in a world-writable directory")
			}
		})
	}
}

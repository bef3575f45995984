package pcp

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	natpmp "github.com/jackpal/go-nat-pmp"
	"github.com/vishvananda/netns"
)

// TestThirdPartyNATPMPClients_6886 runs real third-party NAT-PMP clients
// — Debian's natpmpc and github.com/jackpal/go-nat-pmp — against a tiny
// server built from this codec, inside a throwaway network namespace
// (only its loopback is used). It checks that the codec decodes what they
// send (the bytes must equal the captured vectors in pmp_test.go) and
// that they accept the replies the codec builds.
func TestThirdPartyNATPMPClients_6886(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace")
	}
	ns := newTestNetns(t)
	srv := startPMPServer(t, ns)

	t.Run("natpmpc", func(t *testing.T) {
		if _, err := exec.LookPath("natpmpc"); err != nil {
			t.Skip("natpmpc not installed (apt install natpmpc)")
		}
		srv.reset()
		out, err := exec.Command("ip", "netns", "exec", ns.name, "natpmpc", "-g", "127.0.0.1", "-a", "1234", "1234", "tcp", "3600").CombinedOutput()
		if err != nil {
			t.Fatalf("natpmpc: %v\n%s", err, out)
		}
		for _, want := range []string{"Public IP address : 203.0.113.1", "Mapped public port 1234 protocol TCP to local port 1234 liftime 3600"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("natpmpc did not accept our reply; want %q in:\n%s", want, out)
			}
		}
		srv.expect(t, "0000", "0002000004d204d200000e10")
	})

	t.Run("go-nat-pmp", func(t *testing.T) {
		srv.reset()
		var ext *natpmp.GetExternalAddressResult
		var m *natpmp.AddPortMappingResult
		var err1, err2 error
		ns.do(t, func() {
			// go-nat-pmp opens its socket inside each call, so calling on
			// this thread puts it in the namespace.
			c := natpmp.NewClientWithTimeout(net.IPv4(127, 0, 0, 1), 5*time.Second)
			ext, err1 = c.GetExternalAddress()
			m, err2 = c.AddPortMapping("tcp", 8080, 80, 7200)
		})
		if err1 != nil || err2 != nil {
			t.Fatalf("go-nat-pmp: %v, %v", err1, err2)
		}
		if ext.ExternalIPAddress != [4]byte{203, 0, 113, 1} || ext.SecondsSinceStartOfEpoc != 1000 {
			t.Errorf("address result %+v", ext)
		}
		if m.InternalPort != 8080 || m.MappedExternalPort != 80 || m.PortMappingLifetimeInSeconds != 7200 {
			t.Errorf("mapping result %+v", m)
		}
		srv.expect(t, "0000", "000200001f90005000001c20")
	})
}

// testNetns is a named network namespace with loopback up, deleted at
// cleanup.
type testNetns struct {
	name string
	h    netns.NsHandle
}

func newTestNetns(t *testing.T) *testNetns {
	t.Helper()
	var r [3]byte
	rand.Read(r[:])
	name := "pcpdt-" + hex.EncodeToString(r[:]) + "-pmp"
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v\n%s", err, out)
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return &testNetns{name: name, h: h}
}

// do runs f on an OS thread switched into the namespace; sockets f opens
// live there.
func (n *testNetns) do(t *testing.T, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			t.Error(err)
			return
		}
		defer orig.Close()
		if err := netns.Set(n.h); err != nil {
			t.Error(err)
			return
		}
		f()
		if err := netns.Set(orig); err != nil {
			return // leave the thread locked: it dies with the goroutine
		}
		runtime.UnlockOSThread()
	}()
	<-done
}

// pmpServer answers NAT-PMP on 127.0.0.1:5351 in the namespace using only
// this package, and records what it received.
type pmpServer struct {
	mu   sync.Mutex
	got  []string
	errs []string
}

func startPMPServer(t *testing.T, ns *testNetns) *pmpServer {
	var conn *net.UDPConn
	var err error
	ns.do(t, func() {
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: Port})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s := &pmpServer{}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pkt := buf[:n]
			s.mu.Lock()
			s.got = append(s.got, hex.EncodeToString(pkt))
			s.mu.Unlock()
			var r PMPRequest
			if err := ParsePMPRequest(pkt, &r); err != nil {
				s.mu.Lock()
				s.errs = append(s.errs, err.Error())
				s.mu.Unlock()
				continue
			}
			var out []byte
			if r.Opcode == PMPOpAddress {
				out = AppendPMPAddressResponse(nil, PMPSuccess, 1000, netip.MustParseAddr("203.0.113.1"))
			} else {
				out = AppendPMPMapResponse(nil, r.Opcode, PMPSuccess, 1000, r.InternalPort, r.SuggestedExternalPort, r.Lifetime)
			}
			conn.WriteToUDPAddrPort(out, from)
		}
	}()
	return s
}

func (s *pmpServer) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got, s.errs = nil, nil
}

// expect checks the datagrams received, ignoring retransmissions.
func (s *pmpServer) expect(t *testing.T, want ...string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errs) > 0 {
		t.Errorf("codec rejected client packets: %v", s.errs)
	}
	var got []string
	for _, g := range s.got {
		if len(got) == 0 || got[len(got)-1] != g {
			got = append(got, g)
		}
	}
	if !bytes.Equal([]byte(strings.Join(got, ",")), []byte(strings.Join(want, ","))) {
		t.Errorf("client sent %v, want %v (the captured vectors)", got, want)
	}
}

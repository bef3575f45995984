package netlab

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SocketDir is where userspace WireGuard devices put their control sockets
// (shared by every namespace on the machine).
const SocketDir = "/var/run/wireguard"

var wgBuild struct {
	once sync.Once
	path string
	err  error
}

// BuildWireGuard compiles the userspace WireGuard daemon
// (golang.zx2c4.com/wireguard, a tool of this module) once per process and
// returns the binary's path. It needs the Go toolchain and runs from inside
// the module, as tests do.
func BuildWireGuard() (string, error) {
	wgBuild.once.Do(func() {
		dir, err := os.MkdirTemp("", "netlab-wg-")
		if err != nil {
			wgBuild.err = err
			return
		}
		path := filepath.Join(dir, "wireguard-go")
		out, err := exec.Command("go", "build", "-o", path, "golang.zx2c4.com/wireguard").CombinedOutput()
		if err != nil {
			wgBuild.err = fmt.Errorf("netlab: go build golang.zx2c4.com/wireguard: %v: %s", err, bytes.TrimSpace(out))
			return
		}
		wgBuild.path = path
	})
	return wgBuild.path, wgBuild.err
}

// WireGuardBinary is BuildWireGuard for tests.
func WireGuardBinary(t testing.TB) string {
	t.Helper()
	p, err := BuildWireGuard()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// DefaultWGCommand runs the wireguard-go binary in the foreground; the
// interface name is appended.
func DefaultWGCommand() ([]string, error) {
	p, err := BuildWireGuard()
	if err != nil {
		return nil, err
	}
	return []string{p, "-f"}, nil
}

// StartWireGuardDevice starts a userspace WireGuard interface named ifname
// inside ns with cmd (the interface name is appended to it) and waits for
// its control socket, so wgctrl can configure it at once. The process is
// stopped when ns is closed. Its log (LOG_LEVEL=verbose: handshakes,
// keepalives, errors; no line per data packet) is kept, the last
// wgLogKeep bytes of it, for WireGuardLog.
func StartWireGuardDevice(ns *NS, ifname string, cmd []string) error {
	sock := filepath.Join(SocketDir, ifname+".sock")
	stderr := &syncBuffer{keep: wgLogKeep}
	wgLogs.Store(ifname, stderr)
	_, err := ns.Start(func(c *exec.Cmd) {
		c.Stderr = stderr
		c.Stdout = stderr
		c.Env = append(os.Environ(), "LOG_LEVEL=verbose", "WG_PROCESS_FOREGROUND=1")
	}, append(append([]string{}, cmd...), ifname)...)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(sock); err == nil {
			if _, err := ns.Run("ip", "link", "show", ifname); err == nil {
				return txChecksumOff(ns, ifname)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("netlab: wireguard %s: no control socket %s after 10s: %s", ifname, sock, stderr.String())
}

// StartWireGuard is StartWireGuardDevice for tests, with the built binary.
func StartWireGuard(t testing.TB, ns *NS, ifname, bin string) {
	t.Helper()
	if err := StartWireGuardDevice(ns, ifname, []string{bin, "-f"}); err != nil {
		t.Fatal(err)
	}
}

// wgLogKeep is how much of each WireGuard device's log StartWireGuardDevice
// keeps (its end).
const wgLogKeep = 32 << 10

// wgLogs holds each started WireGuard device's log by interface name
// (*syncBuffer).
var wgLogs sync.Map

// WireGuardLog returns the end of the log of the WireGuard device
// StartWireGuardDevice last started as ifname in this process ("" if
// none): what a test that lost traffic through the tunnel prints (a
// handshake retried, a packet it could not write to its TUN device).
func WireGuardLog(ifname string) string {
	if b, ok := wgLogs.Load(ifname); ok {
		return b.(*syncBuffer).String()
	}
	return ""
}

// syncBuffer collects a child's output while the parent may read it;
// with keep > 0, only about its last keep bytes.
type syncBuffer struct {
	mu   sync.Mutex
	b    bytes.Buffer
	keep int
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keep > 0 && s.b.Len()+len(p) > 2*s.keep {
		// Drop the oldest, keeping the last keep bytes (a copy at
		// most every keep bytes written).
		old := s.b.Bytes()
		if cut := len(old) + len(p) - s.keep; cut < len(old) {
			tail := bytes.Clone(old[cut:])
			s.b.Reset()
			s.b.Write(tail)
		} else {
			s.b.Reset()
		}
	}
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// txChecksumOff turns off the transmit checksum offload of the WireGuard
// device ifname in ns (ethtool -K IFNAME tx off), so that the kernel
// completes every checksum before the device reads the packet.
//
// wireguard-go offers its TUN device checksum offload (TUNSETOFFLOAD
// TUN_F_CSUM), and the kernel then hands it datagrams whose checksum is
// left for the device to complete (CHECKSUM_PARTIAL). wireguard-go
// completes it (tun/offload_linux.go gsoNoneChecksum) without turning a
// computed 0 into 0xffff, which UDP requires (RFC 768; RFC 8200 §8.1): the
// far side's kernel drops such an IPv6 datagram (Udp6InCsumErrors), one
// in 65 536, and drops it again at every resend of the same bytes. So a
// lab request or answer got no reply however often it was sent
// (TestE2ENATPriorPruned in CI, h/flake2; TestWireGuardZeroChecksumUDP).
// The kernel's own completion (skb_checksum_help) writes 0xffff. Off,
// the device also loses TSO and UDP segmentation offload, which depend
// on it: the tunnel's bulk TCP is segmented by the kernel, at a cost
// the lab's few-packet exchanges do not feel.
func txChecksumOff(ns *NS, ifname string) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("netlab: ethtool socket: %w", err)
		}
		defer unix.Close(fd)
		if err := ethtoolValueCall(fd, ifname, unix.ETHTOOL_STXCSUM, 0); err != nil {
			return err
		}
		var v uint32
		if err := ethtoolValueCall(fd, ifname, unix.ETHTOOL_GTXCSUM, 0, &v); err != nil {
			return err
		}
		if v != 0 {
			return fmt.Errorf("netlab: %s: transmit checksum offload still on after turning it off", ifname)
		}
		return nil
	})
}

// ethtoolValue is the kernel's struct ethtool_value.
type ethtoolValue struct{ cmd, data uint32 }

// ifreqData is the kernel's struct ifreq (40 octets) with ifr_data set.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [24 - unsafe.Sizeof(uintptr(0))]byte
}

// ethtoolValueCall runs the SIOCETHTOOL command cmd, a struct
// ethtool_value one, with data on ifname through the socket fd; the
// value the kernel leaves is stored in *out, if given.
func ethtoolValueCall(fd int, ifname string, cmd, data uint32, out ...*uint32) error {
	v := ethtoolValue{cmd: cmd, data: data}
	var ifr ifreqData
	copy(ifr.name[:], ifname)
	ifr.data = unsafe.Pointer(&v)
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	runtime.KeepAlive(&v)
	if e != 0 {
		return fmt.Errorf("netlab: %s: ethtool command %#x: %w", ifname, cmd, e)
	}
	for _, o := range out {
		*o = v.data
	}
	return nil
}

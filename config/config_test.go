package config

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/pflag"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/fsperm"
	"github.com/pcpd/pcpd/policy"
)

func load(t *testing.T, file string, args ...string) (*Config, error) {
	t.Helper()
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	AddFlags(fs)
	if file != "" {
		path := filepath.Join(t.TempDir(), "pcpd.toml")
		if err := os.WriteFile(path, []byte(file), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append([]string{"--config", path}, args...)
	}
	if err := fs.Parse(args); err != nil {
		t.Fatalf("flag parse: %v", err)
	}
	return Load(fs)
}

func TestDefaults(t *testing.T) {
	c, err := load(t, "")
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Interfaces:         []string{"wg0"},
		NftTable:           "pcpd",
		NftChain:           "pcpd",
		NftNotrack:         true,
		StateDir:           "/var/lib/pcpd",
		Socket:             "/run/pcpd/pcpd.sock",
		MinLifetime:        2 * time.Minute,
		MaxLifetime:        24 * time.Hour,
		MaxLeasesPerClient: 256,
		MaxLeases:          65536,
		MemoryLimit:        64<<20 + 256*65536,
		RateLimit:          50,
		RateBurst:          100,
		OwnerRateBurst:     800,
		KernelRateLimit:    200,
		KernelRateBurst:    400,
		// What pcpd's own owner bucket admits (known bug 5).
		KernelOwnerRateLimit: 400,
		KernelOwnerRateBurst: 800,
		// And its bucket for the unowned sources (review S4).
		KernelUnownedRateLimit: 400,
		KernelUnownedRateBurst: 800,
		KernelReversePath:      ReversePathStrict,
		IPv4PortLow:            1024,
		IPv4PortHigh:           65535,
		WireGuardGoneGrace:     time.Minute,
		WireGuardFresh:         time.Second,
		TouchInterval:          time.Minute,
		SnapshotInterval:       time.Hour,
		FirewallCheckInterval:  5 * time.Second,
		FirewallWatch:          true,
		LogLevel:               zapcore.InfoLevel,
		ThirdParty:             ThirdPartyOwned,
	}
	if diff := cmp.Diff(want, c, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Fatalf("defaults (-want +got):\n%s", diff)
	}
	if c.OwnershipSource() != OwnershipWireGuard || c.Attached() || c.Table() != "pcpd" {
		t.Fatalf("derived: source %s attached %v table %s", c.OwnershipSource(), c.Attached(), c.Table())
	}
}

// Flags override the file key by key; everything else keeps the file's value.
func TestFileAndFlags(t *testing.T) {
	file := `
interface = ["wg0", "wg1"]
listen = ["2001:db8:1::1", "[2001:db8:1::2]:5351", "10.100.0.1:5351"]
external-ipv4 = "198.51.100.1"
nat64-prefix = ["2001:db8:64::/96", "2001:db8:ff00::1/56"]
nft-attach = "filter"
nft-notrack = false
state-dir = "/srv/pcpd"
min-lifetime = "1m"
max-lifetime = "2h"
max-leases = 1000
memory-limit = "auto"
rate-limit = 500
kernel-rate-limit = 3000
kernel-reverse-path = "loose"
strict-nonce = true
third-party = "off"
metrics = "127.0.0.1:9351"
log-level = "debug"
ipv4-port-range = "20000-29999"
disable-natpmp = true
allow-ports = "22, 80,443,1024-65535"
deny-ports = "5000-5010"
allow-all-ports = true
reserved-ports = "8080,9000-9002"
touch-interval = "30s"
snapshot-interval = "6h"
wireguard-gone-grace = "0"
wireguard-fresh = "0"

[client]
home = ["2001:db8:1:2::/64", "10.100.0.2"]
office = ["2001:db8:2::/48"]
`
	// --allow-all-ports=false: the file's true contradicts its port
	// rules (TestAllowAllPortsWithPortRules).
	c, err := load(t, file, "--max-lifetime", "3h", "--rate-burst", "2000", "--interface", "wg9", "--client", "lab=2001:db8:9::/48,2001:db8:a::5/64",
		"--snapshot-interval", "15m", "--allow-all-ports=false")
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Interfaces: []string{"wg9"},
		Listen: []netip.AddrPort{
			netip.MustParseAddrPort("[2001:db8:1::1]:5351"),
			netip.MustParseAddrPort("[2001:db8:1::2]:5351"),
			netip.MustParseAddrPort("10.100.0.1:5351"),
		},
		Clients: map[string][]netip.Prefix{
			"lab": {netip.MustParsePrefix("2001:db8:9::/48"), netip.MustParsePrefix("2001:db8:a::/64")},
		},
		ExternalIPv4:           netip.MustParseAddr("198.51.100.1"),
		NAT64Prefixes:          []netip.Prefix{netip.MustParsePrefix("2001:db8:64::/96"), netip.MustParsePrefix("2001:db8:ff00::/56")},
		NftTable:               "pcpd",
		NftAttach:              "filter",
		NftChain:               "pcpd",
		StateDir:               "/srv/pcpd",
		Socket:                 "/run/pcpd/pcpd.sock",
		MinLifetime:            time.Minute,
		MaxLifetime:            3 * time.Hour,
		MaxLeasesPerClient:     256,
		MaxLeases:              1000,
		MemoryLimit:            64<<20 + 256*1000,
		RateLimit:              500,
		RateBurst:              2000,
		OwnerRateBurst:         16000,
		KernelRateLimit:        3000,
		KernelRateBurst:        8000,
		KernelOwnerRateLimit:   4000,  // 8 × rate-limit
		KernelOwnerRateBurst:   16000, // 8 × rate-burst
		KernelUnownedRateLimit: 4000,
		KernelUnownedRateBurst: 16000,
		KernelReversePath:      ReversePathLoose,
		IPv4PortLow:            20000,
		IPv4PortHigh:           29999,
		AllowPorts:             [][2]uint16{{22, 22}, {80, 80}, {443, 443}, {1024, 65535}},
		DenyPorts:              [][2]uint16{{5000, 5010}},
		AllowAllPorts:          false,
		ReservedPorts:          []uint16{8080, 9000, 9001, 9002},
		TouchInterval:          30 * time.Second,
		SnapshotInterval:       15 * time.Minute,
		FirewallCheckInterval:  5 * time.Second,
		FirewallWatch:          true,
		WireGuardGoneGrace:     0, // "0" in the file: no grace
		WireGuardFresh:         0, // "0" in the file: a read per THIRD_PARTY request
		Metrics:                "127.0.0.1:9351",
		LogLevel:               zapcore.DebugLevel,
		StrictNonce:            true,
		ThirdParty:             ThirdPartyOff,
		DisableNATPMP:          true,
	}
	c.File = ""
	if diff := cmp.Diff(want, c, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
		cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
		cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	if c.OwnershipSource() != OwnershipStatic || c.Table() != "filter" {
		t.Fatalf("derived: %s %s", c.OwnershipSource(), c.Table())
	}
}

// Each mistake yields its own one-line message; the CLI prints them and
// exits 2 (cmd/pcpd TestServeBadConfig).
func TestValidationErrors(t *testing.T) {
	tests := []struct {
		name string
		file string
		args []string
		want []string // substrings, one per expected error, in order
	}{
		{name: "bad duration", args: []string{"--max-lifetime", "2x"},
			want: []string{`--max-lifetime: "2x" is not a duration`}},
		{name: "sub-second", args: []string{"--min-lifetime", "1500ms"},
			want: []string{"--min-lifetime: 1.5s is not a whole number of seconds"}},
		{name: "min above max", args: []string{"--min-lifetime", "2h", "--max-lifetime", "1h"},
			want: []string{"--min-lifetime: 2h0m0s is longer than max-lifetime 1h0m0s"}},
		{name: "max beyond 32 bits", args: []string{"--max-lifetime", "1200000h"},
			want: []string{"--max-lifetime: 1200000h0m0s exceeds 8760h0m0s (365 days)"}},
		{name: "max beyond a year", args: []string{"--max-lifetime", "8761h"},
			want: []string{"--max-lifetime: 8761h0m0s exceeds 8760h0m0s (365 days), the longest lease pcpd grants"}},
		{name: "client without prefix", args: []string{"--client", "home"},
			want: []string{`--client "home": want NAME=PREFIX`}},
		{name: "client bad prefix", args: []string{"--client", "home=2001:db8::/200"},
			want: []string{`client "home": "2001:db8::/200" is not a prefix`}},
		{name: "client bad name", args: []string{"--client", "ho me=2001:db8::/48"},
			want: []string{`client name "ho me"`}},
		{name: "client twice", args: []string{"--client", "a=2001:db8:1::/48", "--client", "a=2001:db8:2::/48"},
			want: []string{`client "a" given twice`}},
		{name: "clients overlap", args: []string{"--client", "a=2001:db8:1::/48", "--client", "b=2001:db8:1:2::/64"},
			want: []string{"overlaps client"}},
		{name: "prefix too short", args: []string{"--client", "a=2001:db8::/16"},
			want: []string{"shorter than /32"}},
		{name: "nat64 prefix IPv4", args: []string{"--nat64-prefix", "10.64.0.0/16"},
			want: []string{`--nat64-prefix: "10.64.0.0/16" is not an IPv6 prefix`}},
		{name: "nat64 prefix mapped", args: []string{"--nat64-prefix", "::ffff:10.0.0.0/104"},
			want: []string{`--nat64-prefix: "::ffff:10.0.0.0/104" is not an IPv6 prefix`}},
		{name: "nat64 prefix length", args: []string{"--nat64-prefix", "2001:db8:64::/80"},
			want: []string{`--nat64-prefix: "2001:db8:64::/80": a translation prefix is a /32, /40, /48, /56, /64 or /96 (RFC 6052)`}},
		{name: "nat64 prefix twice", args: []string{"--nat64-prefix", "2001:db8:64::/96", "--nat64-prefix", "2001:db8:64::1/96"},
			want: []string{`--nat64-prefix: "2001:db8:64::1/96" given twice`}},
		{name: "nat64 prefix not a prefix", args: []string{"--nat64-prefix", "nat64"},
			want: []string{`--nat64-prefix: "nat64" is not a prefix`}},
		{name: "external not v4", args: []string{"--external-ipv4", "2001:db8::1"},
			want: []string{`--external-ipv4: "2001:db8::1" is not an IPv4 address`}},
		{name: "external loopback", args: []string{"--external-ipv4", "127.0.0.1"},
			want: []string{"--external-ipv4: 127.0.0.1 is not a unicast address"}},
		{name: "wildcard listen", args: []string{"--listen", "[::]:5351"},
			want: []string{"wildcard address would answer on every interface"}},
		{name: "listen hostname", args: []string{"--listen", "example.com"},
			want: []string{`--listen: "example.com": want an IP address`}},
		{name: "interface too long", args: []string{"--interface", strings.Repeat("a", 128)},
			want: []string{"is not an interface name (1-127 bytes"}},
		{name: "no interface", file: "interface = []\n",
			want: []string{"at least one interface is needed"}},
		{name: "relative state dir", args: []string{"--state-dir", "state"},
			want: []string{`--state-dir: "state" is not an absolute path`}},
		{name: "socket too long", args: []string{"--socket", "/" + strings.Repeat("s", 120)},
			want: []string{"a unix socket path holds at most 107"}},
		{name: "quota zero", args: []string{"--max-leases", "0"},
			want: []string{`--max-leases: "0": want a whole number`}},
		{name: "memory limit", args: []string{"--memory-limit", "lots"},
			want: []string{`--memory-limit: "lots": want auto, 0 (no limit), or a size`}},
		{name: "memory limit too small", args: []string{"--memory-limit", "4k"},
			want: []string{`--memory-limit: "4k": want auto, 0 (no limit), or a size`}},
		{name: "rate limit zero", args: []string{"--rate-limit", "0"},
			want: []string{`--rate-limit: "0": want a whole number`}},
		{name: "kernel rate limit negative", args: []string{"--kernel-rate-limit", "-1"},
			want: []string{`--kernel-rate-limit: "-1": want 0 (off) or a whole number`}},
		{name: "kernel rate limit below rate limit", args: []string{"--rate-limit", "100", "--kernel-rate-limit", "99"},
			want: []string{"--kernel-rate-limit: 99 is below rate-limit 100"}},
		{name: "kernel owner rate limit zero", args: []string{"--kernel-owner-rate-limit", "0"},
			want: []string{`--kernel-owner-rate-limit: "0": want a whole number from 1`}},
		{name: "kernel owner rate limit below the per-source one", args: []string{"--kernel-rate-limit", "300", "--kernel-owner-rate-limit", "299"},
			want: []string{"--kernel-owner-rate-limit: 299 is below kernel-rate-limit 300"}},
		{name: "kernel owner rate limit without the kernel meter", args: []string{"--kernel-rate-limit", "0", "--kernel-owner-rate-limit", "500"},
			want: []string{"--kernel-owner-rate-limit: needs the kernel meter (kernel-rate-limit is 0)"}},
		{name: "kernel unowned rate limit zero", args: []string{"--kernel-unowned-rate-limit", "0"},
			want: []string{`--kernel-unowned-rate-limit: "0": want a whole number from 1`}},
		{name: "kernel unowned rate limit without the kernel meter", args: []string{"--kernel-rate-limit", "0", "--kernel-unowned-rate-limit", "500"},
			want: []string{"--kernel-unowned-rate-limit: needs the kernel meter (kernel-rate-limit is 0)"}},
		{name: "kernel reverse path unknown", args: []string{"--kernel-reverse-path", "feasible"},
			want: []string{`--kernel-reverse-path: "feasible": want strict, loose or off`}},
		{name: "kernel reverse path empty", file: "kernel-reverse-path = \"\"\n",
			want: []string{`kernel-reverse-path: "": want strict, loose or off`}},
		{name: "kernel rate limit as a string", file: "kernel-rate-limit = \"off\"\n",
			want: []string{`kernel-rate-limit: want an integer, got string "off"`}},
		{name: "rate burst not a number", file: "rate-burst = \"lots\"\n",
			want: []string{`rate-burst: want an integer, got string "lots"`}},
		{name: "per-client above total", args: []string{"--max-leases", "10", "--max-leases-per-client", "20"},
			want: []string{"--max-leases-per-client: 20 exceeds max-leases 10"}},
		{name: "port range", args: []string{"--ipv4-port-range", "2000-1000"},
			want: []string{`--ipv4-port-range: "2000-1000": want LOW-HIGH`}},
		{name: "allow ports", args: []string{"--allow-ports", "22,80-x"},
			want: []string{`--allow-ports: "80-x": want ports and LOW-HIGH ranges`}},
		{name: "deny ports", args: []string{"--deny-ports", "0"},
			want: []string{`--deny-ports: "0": want ports`}},
		{name: "all ports with deny ports", args: []string{"--allow-all-ports", "--deny-ports", "25"},
			want: []string{"--allow-all-ports: contradicts allow-ports/deny-ports, which keep port 25 (and maybe more) closed"}},
		{name: "all ports with allow ports", args: []string{"--allow-ports", "1-79,81-65535", "--allow-all-ports"},
			want: []string{"--allow-all-ports: contradicts allow-ports/deny-ports, which keep port 80"}},
		{name: "all ports with port rules in the file", file: "allow-ports = \"22,443\"\nallow-all-ports = true\n",
			want: []string{"allow-all-ports: contradicts allow-ports/deny-ports, which keep port 1 "}},
		{name: "all ports in the file, deny ports as a flag", file: "allow-all-ports = true\n", args: []string{"--deny-ports", "65535"},
			want: []string{"allow-all-ports: contradicts allow-ports/deny-ports, which keep port 65535 "}},
		{name: "reserved ports not a list", args: []string{"--reserved-ports", "8080;8081"},
			want: []string{`--reserved-ports: "8080;8081": want ports and LOW-HIGH ranges`}},
		{name: "reserved port zero", file: "reserved-ports = \"0-10\"\n",
			want: []string{`reserved-ports: "0-10": want ports`}},
		{name: "reserved ports as an array", file: "reserved-ports = [\"8080\"]\n",
			want: []string{"reserved-ports: want a string, got an array"}},
		{name: "reserved ports fill the IPv4 range", args: []string{"--ipv4-port-range", "40000-40009", "--reserved-ports", "40000-40004,40005-40009"},
			want: []string{"--reserved-ports: reserves every port of ipv4-port-range 40000-40009"}},
		{name: "touch interval", args: []string{"--touch-interval", "often"},
			want: []string{`--touch-interval: "often" is not a duration`}},
		{name: "touch interval sub-second", args: []string{"--touch-interval", "100ms"},
			want: []string{"--touch-interval: 100ms is shorter than one second"}},
		{name: "snapshot interval negative", args: []string{"--snapshot-interval", "-1h"},
			want: []string{"--snapshot-interval: -1h0m0s is shorter than one second"}},
		{name: "snapshot interval as a number", file: "snapshot-interval = 3600\n",
			want: []string{`snapshot-interval: want a duration string such as "90s" or "2h", got integer 3600`}},
		{name: "wireguard fresh over 5s", args: []string{"--wireguard-fresh", "6s"},
			want: []string{"--wireguard-fresh: 6s is longer than 5s"}},
		{name: "wireguard fresh sub-second", args: []string{"--wireguard-fresh", "500ms"},
			want: []string{"--wireguard-fresh: 500ms is shorter than one second"}},
		{name: "wireguard gone grace", args: []string{"--wireguard-gone-grace", "soon"},
			want: []string{`--wireguard-gone-grace: "soon" is not a duration`}},
		{name: "wireguard gone grace sub-second", args: []string{"--wireguard-gone-grace", "500ms"},
			want: []string{"--wireguard-gone-grace: 500ms is shorter than one second"}},
		{name: "wireguard gone grace negative", args: []string{"--wireguard-gone-grace", "-1m"},
			want: []string{"--wireguard-gone-grace: -1m0s is shorter than one second"}},
		{name: "wireguard gone grace over an hour", file: "wireguard-gone-grace = \"2h\"\n",
			want: []string{"wireguard-gone-grace: 2h0m0s is longer than 1h"}},
		{name: "metrics", args: []string{"--metrics", "9351"},
			want: []string{`--metrics: "9351": want HOST:PORT`}},
		{name: "log level", args: []string{"--log-level", "loud"},
			want: []string{`--log-level: "loud": want debug, info, warn or error`}},
		{name: "third party", args: []string{"--third-party", "all"},
			want: []string{`--third-party: "all": want owned or off`}},
		{name: "nft table", args: []string{"--nft-table", "my table"},
			want: []string{`--nft-table: "my table" is not a table name`}},
		{name: "unknown file key", file: "max_lifetime = \"2h\"\n",
			want: []string{`unknown key "max_lifetime"`}},
		{name: "file wrong type", file: "max-lifetime = 3600\n",
			want: []string{`max-lifetime: want a duration string such as "90s" or "2h", got integer 3600`}},
		{name: "file int as string", file: "max-leases = \"10\"\n",
			want: []string{`max-leases: want an integer, got string "10"`}},
		{name: "file syntax", file: "max-lifetime = \n",
			want: []string{"pcpd.toml: toml:"}},
		{name: "file client not table", file: "client = \"home\"\n",
			want: []string{"client: want a table of client names"}},
		{name: "several mistakes at once",
			args: []string{"--max-lifetime", "x", "--log-level", "loud", "--external-ipv4", "nope"},
			want: []string{"--external-ipv4", "--max-lifetime", "--log-level"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.file, tt.args...)
			if err == nil {
				t.Fatalf("no error, config %+v", c)
			}
			if !errors.Is(err, ErrInvalid) && !strings.Contains(err.Error(), "read config file") {
				t.Errorf("error does not wrap ErrInvalid: %v", err)
			}
			var errs Errors
			if !errors.As(err, &errs) {
				t.Fatalf("error is %T, want Errors", err)
			}
			if len(errs) != len(tt.want) {
				t.Fatalf("got %d errors, want %d: %v", len(errs), len(tt.want), []error(errs))
			}
			for i, e := range errs {
				msg := e.Error()
				if strings.Contains(msg, "\n") {
					t.Errorf("message is not one line: %q", msg)
				}
				if !strings.HasPrefix(msg, "config: ") {
					t.Errorf("message lacks the package prefix: %q", msg)
				}
				if !strings.Contains(msg, tt.want[i]) {
					t.Errorf("error %d = %q, want it to contain %q", i, msg, tt.want[i])
				}
			}
		})
	}
}

// An interface is named by its kernel name (at most 15 bytes) or by an
// alternative name, "ip link property add dev wg0 altname ...", of up to
// 127 bytes (ALTIFNAMSIZ 128 with the NUL): both are taken from the flag
// and the file alike; longer, empty and malformed names are refused with
// the reason. Bytes count, not characters (the kernel's limit is bytes).
func TestInterfaceNames(t *testing.T) {
	long := func(n int) string { return strings.Repeat("x", n) }
	for _, tt := range []struct {
		name  string
		iface string
		err   string // "" = accepted
	}{
		{"kernel name", "wg0", ""},
		{"15 bytes, the longest kernel name", long(15), ""},
		{"16 bytes: only an altname", long(16), ""},
		{"40-byte altname", "enp0s31f6-" + long(30), ""},
		{"127 bytes, the longest altname", long(127), ""},
		{"126 bytes in 63 two-byte characters", strings.Repeat("ä", 63), ""},
		{"128 bytes", long(128), "is not an interface name (1-127 bytes: a kernel name of at most 15, or an altname)"},
		{"128 bytes in 64 two-byte characters", strings.Repeat("ä", 64), "is not an interface name (1-127 bytes"},
		{"long with a slash", long(20) + "/x", "is not an interface name (no '/', ':' or spaces)"},
		{"long with a colon", long(20) + ":x", "is not an interface name (no '/', ':' or spaces)"},
	} {
		for _, how := range []string{"flag", "file"} {
			t.Run(tt.name+"/"+how, func(t *testing.T) {
				var c *Config
				var err error
				if how == "flag" {
					c, err = load(t, "", "--interface", tt.iface)
				} else {
					c, err = load(t, fmt.Sprintf("interface = [%q]\n", tt.iface))
				}
				switch {
				case tt.err == "" && err != nil:
					t.Fatalf("interface %q (%d bytes): %v", tt.iface, len(tt.iface), err)
				case tt.err == "" && (len(c.Interfaces) != 1 || c.Interfaces[0] != tt.iface):
					t.Fatalf("interface %q: Interfaces %q", tt.iface, c.Interfaces)
				case tt.err != "" && err == nil:
					t.Fatalf("interface %q (%d bytes) accepted: %q", tt.iface, len(tt.iface), c.Interfaces)
				case tt.err != "" && !strings.Contains(err.Error(), tt.err):
					t.Fatalf("interface %q: error %q, want it to contain %q", tt.iface, err, tt.err)
				}
			})
		}
	}
}

// --reserved-ports: the ranges become sorted ports without repeats; what
// server.Config.ReservedPorts takes.
// The kernel's request meter (--kernel-rate-limit, PKT-08) follows
// --rate-limit unless set; 0 turns it off; its burst follows --rate-burst.
// Its owner share (--kernel-owner-rate-limit) is by default what pcpd's
// own per-owner bucket admits (policy.OwnerRateFactor × --rate-limit and
// --rate-burst), never below the per-source meter (known bug 5), and its
// burst never below --max-leases-per-client (a client's whole quota
// renewed at once must not be cut in the kernel).
func TestKernelRateLimit(t *testing.T) {
	for _, tt := range []struct {
		name                  string
		args                  []string
		rate, burst           int
		ownerRate, ownerBurst int // 0: no owner meter
		bucketBurst           int // pcpd's own owner bucket's; 0: 800
	}{
		{"default", nil, 200, 400, 400, 800, 0},
		{"follows rate-limit and rate-burst", []string{"--rate-limit", "500", "--rate-burst", "30"}, 2000, 120, 4000, 256, 256}, // the quota, 256 > 8 × 30
		{"owner burst follows the quota", []string{"--max-leases-per-client", "2000"}, 200, 400, 400, 2000, 2000},
		{"quota below the owner burst", []string{"--max-leases-per-client", "100"}, 200, 400, 400, 800, 0},
		{"owner rate set, burst follows the quota", []string{"--kernel-owner-rate-limit", "300", "--max-leases-per-client", "1000"}, 200, 400, 300, 1000, 1000},
		{"kernel meter off, bucket follows the quota", []string{"--kernel-rate-limit", "0", "--max-leases-per-client", "1000"}, 0, 400, 0, 0, 1000},
		{"off", []string{"--kernel-rate-limit", "0"}, 0, 400, 0, 0, 0},
		{"explicit", []string{"--kernel-rate-limit", "1000"}, 1000, 400, 1000, 800, 0},
		{"equal to rate-limit", []string{"--rate-limit", "70", "--kernel-rate-limit", "70"}, 70, 400, 560, 800, 0},
		{"owner rate", []string{"--kernel-owner-rate-limit", "5000"}, 200, 400, 5000, 10000, 0},
		{"owner rate equal to the source's", []string{"--kernel-owner-rate-limit", "200"}, 200, 400, 200, 400, 0},
		{"owner rate of before", []string{"--kernel-owner-rate-limit", "1600"}, 200, 400, 1600, 3200, 0},
		{"owner burst not below the source's", []string{"--rate-burst", "1000", "--kernel-owner-rate-limit", "300"}, 200, 4000, 300, 4000, 8000},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, "", tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			if c.KernelRateLimit != tt.rate || c.KernelRateBurst != tt.burst {
				t.Errorf("kernel rate %d burst %d, want %d and %d", c.KernelRateLimit, c.KernelRateBurst, tt.rate, tt.burst)
			}
			if c.KernelOwnerRateLimit != tt.ownerRate || c.KernelOwnerRateBurst != tt.ownerBurst {
				t.Errorf("kernel owner rate %d burst %d, want %d and %d", c.KernelOwnerRateLimit, c.KernelOwnerRateBurst, tt.ownerRate, tt.ownerBurst)
			}
			want := tt.bucketBurst
			if want == 0 {
				want = 800
			}
			if c.OwnerRateBurst != want {
				t.Errorf("pcpd's owner bucket burst %d, want %d", c.OwnerRateBurst, want)
			}
		})
	}
}

// --kernel-unowned-rate-limit (review S4): the kernel's one bucket for
// every source no client owns is by default what pcpd's own bucket for them
// admits (one client's: 8 × --rate-limit, burst OwnerRateBurst, at least
// the per-source meter's), not an explicit --kernel-owner-rate-limit; set,
// its burst is twice the rate; off with the kernel meter.
func TestKernelUnownedRateLimit(t *testing.T) {
	for _, tt := range []struct {
		name        string
		file        string
		args        []string
		rate, burst int
	}{
		{"default", "", nil, 400, 800},
		{"follows rate-limit and rate-burst", "", []string{"--rate-limit", "500", "--rate-burst", "30"}, 4000, 256},
		{"not the explicit owner rate", "", []string{"--kernel-owner-rate-limit", "16000000"}, 400, 800},
		{"at least the per-source meter", "", []string{"--kernel-rate-limit", "1000"}, 1000, 800},
		{"set", "", []string{"--kernel-unowned-rate-limit", "100"}, 100, 200},
		{"set in the file", "kernel-unowned-rate-limit = 3000\n", nil, 3000, 6000},
		{"kernel meter off", "", []string{"--kernel-rate-limit", "0"}, 0, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.file, tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			if c.KernelUnownedRateLimit != tt.rate || c.KernelUnownedRateBurst != tt.burst {
				t.Errorf("kernel unowned rate %d burst %d, want %d and %d", c.KernelUnownedRateLimit, c.KernelUnownedRateBurst, tt.rate, tt.burst)
			}
		})
	}
}

// --kernel-reverse-path: strict unless set (RELIABILITY.md bug 4: the
// check is what keeps a spoofed source from using up a client's rate);
// the flag wins over the file.
func TestKernelReversePath(t *testing.T) {
	for _, tt := range []struct {
		name, file string
		args       []string
		want       string
	}{
		{"default", "", nil, ReversePathStrict},
		{"loose", "", []string{"--kernel-reverse-path", "loose"}, ReversePathLoose},
		{"off in the file", "kernel-reverse-path = \"off\"\n", nil, ReversePathOff},
		{"flag over file", "kernel-reverse-path = \"off\"\n", []string{"--kernel-reverse-path", "strict"}, ReversePathStrict},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.file, tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			if c.KernelReversePath != tt.want {
				t.Errorf("KernelReversePath %q, want %q", c.KernelReversePath, tt.want)
			}
		})
	}
}

// TestAllowAllPortsWithPortRules: allow-all-ports is accepted with port
// rules that keep no port closed, the only ones under which the policy
// grants an all-ports mapping (policy.New); the contradictory
// combinations are refused (TestValidationErrors).
func TestAllowAllPortsWithPortRules(t *testing.T) {
	tests := []struct {
		name string
		file string
		args []string
	}{
		{name: "alone", args: []string{"--allow-all-ports"}},
		{name: "allow every port", args: []string{"--allow-all-ports", "--allow-ports", "1-65535"}},
		{name: "allow every port in pieces", args: []string{"--allow-all-ports", "--allow-ports", "1-1000,1001,1000-65535"}},
		{name: "file", file: "allow-ports = \"1-65535\"\nallow-all-ports = true\n"},
		{name: "deny ports without all ports", args: []string{"--deny-ports", "25"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, tt.file, tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			if want := tt.name != "deny ports without all ports"; c.AllowAllPorts != want {
				t.Fatalf("AllowAllPorts %v, want %v", c.AllowAllPorts, want)
			}
			var allow, deny []policy.PortRange
			for _, r := range c.AllowPorts {
				allow = append(allow, policy.PortRange{First: r[0], Last: r[1]})
			}
			for _, r := range c.DenyPorts {
				deny = append(deny, policy.PortRange{First: r[0], Last: r[1]})
			}
			// What is accepted is effective: the policy grants the
			// all-ports mapping the switch asks for.
			st, err := policy.NewStatic(nil)
			if err != nil {
				t.Fatal(err)
			}
			p, err := policy.New(policy.Config{AllowPorts: allow, DenyPorts: deny, AllowAllPorts: c.AllowAllPorts}, st)
			if err != nil {
				t.Fatal(err)
			}
			want := policy.AllPortsDenied
			if c.AllowAllPorts {
				want = policy.Allowed
			}
			if r := p.Rules(policy.Request{Target: netip.MustParseAddr("2001:db8::1"), Protocol: 6}); r != want {
				t.Fatalf("all-ports mapping: %v, want %v", r, want)
			}
		})
	}
}

func TestReservedPorts(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want []uint16
	}{
		{name: "unset", want: nil},
		{name: "one port", args: []string{"--reserved-ports", "51820"}, want: []uint16{51820}},
		{name: "ports and a range", args: []string{"--reserved-ports", "9000-9002, 8080"}, want: []uint16{8080, 9000, 9001, 9002}},
		{name: "overlapping ranges", args: []string{"--reserved-ports", "10-12,11-13,12"}, want: []uint16{10, 11, 12, 13}},
		{name: "outside the IPv4 range", args: []string{"--ipv4-port-range", "20000-29999", "--reserved-ports", "80"}, want: []uint16{80}},
		{name: "all but one of the IPv4 range", args: []string{"--ipv4-port-range", "40000-40002", "--reserved-ports", "40000-40001"}, want: []uint16{40000, 40001}},
		{name: "the most allowed", args: []string{"--reserved-ports", "2000-3023"}, want: seq(2000, 3023)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := load(t, "", tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, c.ReservedPorts); diff != "" {
				t.Fatalf("ReservedPorts (-want +got):\n%s", diff)
			}
		})
	}
}

// seq is the ports lo to hi.
func seq(lo, hi uint16) []uint16 {
	var s []uint16
	for p := int(lo); p <= int(hi); p++ {
		s = append(s, uint16(p))
	}
	return s
}

func TestMissingFile(t *testing.T) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	AddFlags(fs)
	if err := fs.Parse([]string{"--config", filepath.Join(t.TempDir(), "absent.toml")}); err != nil {
		t.Fatal(err)
	}
	_, err := Load(fs)
	if err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("got %v, want a no-such-file error", err)
	}
}

// Every flag has a file key of the same name (DESIGN.md); the settings table
// is the single source of both, and this keeps DESIGN's flags present.
func TestEveryDesignFlagExists(t *testing.T) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	AddFlags(fs)
	for _, name := range []string{"config", "interface", "listen", "client", "external-ipv4", "nft-table",
		"state-dir", "socket", "min-lifetime", "max-lifetime", "max-leases-per-client", "max-leases", "metrics"} {
		if fs.Lookup(name) == nil {
			t.Errorf("flag --%s missing", name)
		}
	}
	for _, s := range settings {
		if _, err := load(t, s.name+" = 0\n"); err != nil && strings.Contains(err.Error(), "unknown key") {
			t.Errorf("flag --%s has no file key", s.name)
		}
	}
}

// dist/pcpd.toml is the documented example: it loads without a mistake and
// mentions every key (set or commented out with its default).
func TestExampleConfig(t *testing.T) {
	path := filepath.Join("..", "dist", "pcpd.toml")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	AddFlags(fs)
	if err := fs.Parse([]string{"--config", path}); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(fs); err != nil {
		t.Fatalf("example config: %v", err)
	}
	for _, s := range settings {
		key := s.name + " ="
		if s.kind == kClients {
			key = "[" + s.name + "]"
		}
		if !strings.Contains(string(data), key) {
			t.Errorf("example config does not mention %q", key)
		}
	}
	// Uncommenting every key must still load: the commented values are valid.
	var lines []string
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "# ") && (strings.Contains(l, " = ") || strings.HasPrefix(l, "# [")) && !strings.Contains(l, "nft-attach") {
			l = strings.TrimPrefix(l, "# ")
		}
		lines = append(lines, l)
	}
	all := filepath.Join(t.TempDir(), "all.toml")
	os.WriteFile(all, []byte(strings.Join(lines, "\n")), 0o600)
	fs = pflag.NewFlagSet("serve", pflag.ContinueOnError)
	AddFlags(fs)
	fs.Parse([]string{"--config", all})
	if _, err := Load(fs); err != nil {
		t.Fatalf("example config with every key uncommented: %v", err)
	}
}

// --memory-limit: auto follows --max-leases (flag or file), 0 turns the
// limit off, and sizes take binary suffixes.
func TestMemoryLimit(t *testing.T) {
	tests := []struct {
		name string
		file string
		args []string
		want int64
	}{
		{"default is auto at the default max-leases", "", nil, MemoryLimitBase + MemoryLimitPerLease*DefaultMaxLeases},
		{"auto follows max-leases", "", []string{"--max-leases", "1000000"}, 64<<20 + 256*1_000_000},
		{"auto follows the file's max-leases", "max-leases = 4000000\n", nil, 64<<20 + 256*4_000_000},
		{"off", "", []string{"--memory-limit", "0"}, 0},
		{"bytes", "", []string{"--memory-limit", "536870912"}, 512 << 20},
		{"MiB", "memory-limit = \"512MiB\"\n", nil, 512 << 20},
		{"M", "", []string{"--memory-limit", "300M"}, 300 << 20},
		{"G lower case", "", []string{"--memory-limit", "2g"}, 2 << 30},
		{"KiB", "", []string{"--memory-limit", "4096KiB"}, 4 << 20},
		{"flag over file", "memory-limit = \"1G\"\n", []string{"--memory-limit", "auto"}, 64<<20 + 256*65536},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(t, tc.file, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if c.MemoryLimit != tc.want {
				t.Fatalf("MemoryLimit %d, want %d", c.MemoryLimit, tc.want)
			}
		})
	}
}

// TestQuotaBurstCapped: the quota raises the per-client bursts only up to
// QuotaBurstCap. A quota set to max-leases (no per-client quota) gave one
// client a burst of 65 536, above the ~2 500 datagrams that overflow
// pcpd's socket buffer on a one-core server (review of 2026-12-03).
func TestQuotaBurstCapped(t *testing.T) {
	for _, tc := range []struct {
		name        string
		args        []string
		owner, kern int
	}{
		{"default", nil, 800, 800},
		{"quota 1200", []string{"--max-leases-per-client", "1200"}, 1200, 1200},
		{"quota 65536", []string{"--max-leases-per-client", "65536"}, QuotaBurstCap, QuotaBurstCap},
		{"quota 65536, explicit owner rate", []string{"--max-leases-per-client", "65536", "--kernel-owner-rate-limit", "500"}, QuotaBurstCap, QuotaBurstCap},
		{"explicit rate-burst above the cap", []string{"--max-leases-per-client", "65536", "--rate-burst", "500"}, 4000, 4000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(t, "", tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if c.OwnerRateBurst != tc.owner || c.KernelOwnerRateBurst != tc.kern {
				t.Errorf("owner bucket burst %d, kernel owner burst %d; want %d, %d", c.OwnerRateBurst, c.KernelOwnerRateBurst, tc.owner, tc.kern)
			}
		})
	}
}

// TestConfigFileTrusted (review h/revctl): a config file another user can
// change is refused: whoever writes it decides who owns which prefixes
// (static clients) and which ports open. A file owned by another user,
// group- or world-writable, or in a directory another user can write
// (they could replace it) fails; pcpd's own or root's 0644/0600 file in
// a root 0755 directory or a sticky one (/tmp) loads.
func TestConfigFileTrusted(t *testing.T) {
	root := os.Geteuid() == 0
	for _, tc := range []struct {
		name      string
		fileMode  os.FileMode
		fileUID   int
		dirMode   os.FileMode
		needsRoot bool
		ok        bool
	}{
		{"own 0600", 0o600, -1, 0o755, false, true},
		{"own 0644", 0o644, -1, 0o755, false, true},
		{"own 0644 in a sticky world-writable directory", 0o644, -1, os.ModeSticky | 0o777, false, true},
		{"world-writable file", 0o666, -1, 0o755, false, false},
		{"group-writable file", 0o664, -1, 0o755, false, false},
		{"file owned by another user", 0o644, 65534, 0o755, true, false},
		{"directory world-writable, not sticky", 0o644, -1, 0o777, false, false},
		{"directory group-writable", 0o644, -1, 0o775, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needsRoot && !root {
				t.Skip("needs root to chown")
			}
			dir := filepath.Join(t.TempDir(), "etc")
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "pcpd.toml")
			if err := os.WriteFile(path, []byte("interface = [\"wg0\"]\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tc.fileMode); err != nil {
				t.Fatal(err)
			}
			if tc.fileUID >= 0 {
				if err := os.Chown(path, tc.fileUID, -1); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Chmod(dir, tc.dirMode); err != nil {
				t.Fatal(err)
			}
			loadTrusted(t, path, tc.ok)
		})
	}
}

// TestConfigFileSymlinkTrusted (review h/revfsperm): a config path
// through another user's symlink in a sticky directory passed while the
// link pointed at a trusted file (only the resolved path was checked, and
// after the file was read); its owner could point it at their own file.
func TestConfigFileSymlinkTrusted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	for _, tc := range []struct {
		name string
		uid  int // the symlink's owner, -1: ours
		ok   bool
	}{
		{"own symlink", -1, true},
		{"another user's symlink", 65534, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := t.TempDir()
			tmp, etc := filepath.Join(b, "tmp"), filepath.Join(b, "etc")
			for _, d := range []string{tmp, etc} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Chmod(tmp, os.ModeSticky|0o777); err != nil {
				t.Fatal(err)
			}
			file, link := filepath.Join(etc, "pcpd.toml"), filepath.Join(tmp, "pcpd.toml")
			if err := os.WriteFile(file, []byte("interface = [\"wg0\"]\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(file, link); err != nil {
				t.Fatal(err)
			}
			if tc.uid >= 0 {
				if err := os.Lchown(link, tc.uid, -1); err != nil {
					t.Fatal(err)
				}
			}
			loadTrusted(t, link, tc.ok)
		})
	}
}

// TestConfigFileNotOpenedUntrusted (review h/revfsperm2): the config file
// is opened only once its path is trusted. On main it was opened first
// (as root, before fsperm.File): a path the check then refused could
// still be a FIFO (pcpd hung in open, never refusing), a device (opened
// as root: a watchdog arms, a tty becomes pcpd's controlling terminal)
// or another user's file. Seen here with inotify: IN_OPEN on the file.
func TestConfigFileNotOpenedUntrusted(t *testing.T) {
	root := os.Geteuid() == 0
	for _, tc := range []struct {
		name      string
		setup     func(t *testing.T, b string) string // the --config path
		needsRoot bool
		ok        bool
	}{
		{"own file", func(t *testing.T, b string) string {
			return writeConfigIn(t, b+"/etc", 0o755)
		}, false, true},
		{"own file in a world-writable directory", func(t *testing.T, b string) string {
			return writeConfigIn(t, b+"/pub", 0o777)
		}, false, false},
		{"own file through another user's symlink in a sticky directory", func(t *testing.T, b string) string {
			file := writeConfigIn(t, b+"/etc", 0o755)
			if err := os.Mkdir(b+"/tmp", 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(b+"/tmp", os.ModeSticky|0o777); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(file, b+"/tmp/pcpd.toml"); err != nil {
				t.Fatal(err)
			}
			if err := os.Lchown(b+"/tmp/pcpd.toml", 65534, -1); err != nil {
				t.Fatal(err)
			}
			return b + "/tmp/pcpd.toml"
		}, true, false},
		{"another user's file", func(t *testing.T, b string) string {
			file := writeConfigIn(t, b+"/etc", 0o755)
			if err := os.Chown(file, 65534, -1); err != nil {
				t.Fatal(err)
			}
			return file
		}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needsRoot && !root {
				t.Skip("needs root to chown")
			}
			path := tc.setup(t, t.TempDir())
			in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
			if err != nil {
				t.Skipf("inotify: %v", err)
			}
			defer unix.Close(in)
			// Watches the file the path leads to (inotify follows links).
			if _, err := unix.InotifyAddWatch(in, path, unix.IN_OPEN); err != nil {
				t.Fatal(err)
			}
			fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
			AddFlags(fs)
			if err := fs.Parse([]string{"--config", path}); err != nil {
				t.Fatal(err)
			}
			_, lerr := Load(fs)
			// The events are queued by open itself: all there by now.
			buf := make([]byte, 4096)
			n, err := unix.Read(in, buf)
			if err != nil && !errors.Is(err, unix.EAGAIN) {
				t.Fatal(err)
			}
			opened := n > 0
			if tc.ok {
				if lerr != nil || !opened {
					t.Fatalf("Load: %v; opened: %v", lerr, opened)
				}
				return
			}
			if !errors.Is(lerr, ErrInvalid) || !errors.Is(lerr, fsperm.ErrUnsafe) {
				t.Fatalf("Load: %v, want ErrInvalid and fsperm.ErrUnsafe", lerr)
			}
			if opened {
				t.Errorf("the refused config file %s was opened", path)
			}
		})
	}
}

// writeConfigIn writes a valid pcpd.toml (root's or ours, 0644) in a new
// directory dir of mode mode.
func writeConfigIn(t *testing.T, dir string, mode os.FileMode) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "pcpd.toml")
	if err := os.WriteFile(file, []byte("interface = [\"wg0\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// loadTrusted loads the config at path: ok, it loads; else Load refuses
// it as invalid and unsafe (fsperm.ErrUnsafe).
func loadTrusted(t *testing.T, path string, ok bool) {
	t.Helper()
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	AddFlags(fs)
	if err := fs.Parse([]string{"--config", path}); err != nil {
		t.Fatal(err)
	}
	_, err := Load(fs)
	if ok {
		if err != nil {
			t.Fatalf("Load: %v", err)
		}
		return
	}
	if err == nil {
		t.Fatal("Load of an untrusted config file succeeded")
	}
	if !errors.Is(err, ErrInvalid) || !errors.Is(err, fsperm.ErrUnsafe) {
		t.Fatalf("Load: %v, want ErrInvalid and fsperm.ErrUnsafe", err)
	}
}

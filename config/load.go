package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"syscall"

	"github.com/BurntSushi/toml"
	"github.com/spf13/pflag"

	"github.com/pcpd/pcpd/internal/fsperm"
)

// kind is how a setting is spelled on the command line and in the file.
type kind int

const (
	kString   kind = iota // one string
	kInt                  // integer (a TOML integer; digits on the command line)
	kDuration             // Go duration string: "90s", "2h"
	kBool                 // flag without value; TOML boolean
	kList                 // repeatable flag; TOML array of strings
	kClients              // --client NAME=PFX[,PFX]; TOML table [client] NAME = ["PFX", ...]
)

// setting is one configuration knob: its flag, its file key (the same
// name), its default and its help text.
type setting struct {
	name  string
	kind  kind
	def   string   // default for kString/kInt/kDuration; "true" for kBool
	defs  []string // default for kList
	usage string
}

// settings is the single list of every knob; flags, file keys, the example
// config and the README table all follow it.
var settings = []setting{
	{name: "interface", kind: kList, defs: []string{DefaultInterface},
		usage: "interface `NAME` to serve on (repeatable): its kernel name or an altname of up to 127 bytes; requests from any other interface are never answered"},
	{name: "listen", kind: kList,
		usage: "explicit listen address `ADDR`, host or [host]:port (repeatable; default: every address of each --interface, port 5351)"},
	{name: "client", kind: kClients,
		usage: "static ownership, `NAME=PFX[,PFX]`: client NAME owns these prefixes (repeatable); with no --client, ownership is WireGuard's (peers' AllowedIPs on --interface)"},
	{name: "nat64-prefix", kind: kList,
		usage: "IPv6 prefix `PFX` this host or its network translates to IPv4 (repeatable): a network-specific NAT64 or SIIT prefix (RFC 6052: /32, /40, /48, /56, /64 or /96); its addresses stand for IPv4 hosts and are never opened (NOT_AUTHORIZED), as those of 64:ff9b::/96 (RFC 6052), 64:ff9b:1::/48 (RFC 8215) and ::/96 always are; a client prefix or AllowedIP overlapping one is logged once"},
	{name: "external-ipv4", kind: kString,
		usage: "public IPv4 address `ADDR` for IPv4 mappings (PCP over IPv4 and NAT-PMP); unset: IPv4 mappings are refused"},
	{name: "nft-table", kind: kString, def: DefaultNftTable,
		usage: "nftables table `NAME` (family inet) pcpd creates and manages in standalone mode"},
	{name: "nft-attach", kind: kString,
		usage: "attached mode: create only pcpd's sets and chain inside the admin's existing inet table `TABLE`, for its forward chain to jump to (replaces --nft-table)"},
	{name: "nft-chain", kind: kString, def: DefaultNftChain,
		usage: "attached mode: the chain `NAME` pcpd fills in the --nft-attach table, for the admin's forward chain to jump to; its other objects there are named NAME_*"},
	{name: "nft-notrack", kind: kBool, def: "true",
		usage: "standalone mode: keep pcpd's own datagrams (UDP to its port on this host, and from it) out of conntrack, so requests cannot fill the conntrack table; --nft-notrack=false when other rules on the host need them tracked (they see \"ct state untracked\")"},
	{name: "wireguard-gone-grace", kind: kDuration, def: "1m",
		usage: "WireGuard ownership: how long a served interface that disappeared (wg-quick down/up, systemctl restart wg-quick@wg0) keeps its last peers owning their AllowedIPs for the ownership sweep, a `DURATION` (0: none); their leases and pinholes are revoked only when it is still gone after that (it serves no request meanwhile); back with other peers or AllowedIPs, what changed is revoked at once"},
	{name: "wireguard-fresh", kind: kDuration, def: "1s",
		usage: "WireGuard ownership: every request that opens or extends a pinhole (PCP MAP and PEER, THIRD_PARTY or not, renewals, NAT-PMP mappings) is judged by a read of the peers begun no more than this `DURATION` before it arrived (while such requests come, pcpd re-reads every half DURATION; one that finds the view older waits for a read in a bounded queue), so a peer cannot open a prefix just carved out of its AllowedIPs, or a removed peer's, in its own name; 0: a read begun after each such request (whole seconds, at most 5s, the periodic read's interval)"},
	{name: "state-dir", kind: kString, def: DefaultStateDir,
		usage: "directory `DIR` for durable state (leases, epoch)"},
	{name: "socket", kind: kString, def: DefaultSocket,
		usage: "control socket `PATH` for pcpd leases, revoke and status"},
	{name: "touch-interval", kind: kDuration, def: "1m",
		usage: "how often pcpd records in its state that it is alive, a `DURATION` (one write each); a clock found earlier than that record at the next start was set back, and the epoch resets (EPO-04): shorter catches smaller steps"},
	{name: "snapshot-interval", kind: kDuration, def: "1h",
		usage: "how often the state's backup copy is written, a `DURATION` (also at every orderly stop); a damaged state file is restored from it, losing what changed since"},
	{name: "firewall-check-interval", kind: kDuration, def: "5s",
		usage: "how often pcpd checks that its nftables table, sets and chains are intact, a `DURATION`, restoring any deleted or flushed by hand (and their pinholes) at the check that finds it; the check dumps no set, so its cost does not grow with the pinholes"},
	{name: "firewall-watch", kind: kBool, def: "true",
		usage: "follow the kernel's nftables notifications, so that someone else's change to pcpd's table, sets, chains or rules is repaired at once and a pinhole of a live lease deleted by hand is put back at once (not at the next firewall check, the lease's renewal or the hourly audit); --firewall-watch=false leaves it to the periodic check"},
	{name: "min-lifetime", kind: kDuration, def: "2m",
		usage: "shortest lifetime granted, a `DURATION`; shorter requests are raised to it (RFC 6887 §15 suggests 2m)"},
	{name: "max-lifetime", kind: kDuration, def: "24h",
		usage: "longest lifetime granted, a `DURATION` up to 8760h (365 days: pinholes are kernel elements whose timeouts pcpd keeps within a year); longer requests are cut to it"},
	{name: "max-leases-per-client", kind: kInt, def: fmt.Sprint(DefaultMaxLeasesPerClient),
		usage: "`N` leases one client may hold; beyond it new mappings get USER_EX_QUOTA; the per-client request bursts (pcpd's own, 8 × --rate-burst, and the kernel's, --kernel-owner-rate-limit) are at least N (up to 2048), so a client's whole quota renewed at once is answered"},
	{name: "max-leases", kind: kInt, def: fmt.Sprint(DefaultMaxLeases),
		usage: "`N` leases in total; beyond it new mappings get NO_RESOURCES"},
	{name: "memory-limit", kind: kString, def: MemoryLimitAuto,
		usage: "soft limit on the Go runtime's memory, a `SIZE` in bytes or with a K, M or G suffix (binary: KiB, MiB, GiB), or auto (64 MiB + 256 bytes × max-leases) or 0 (no limit); ignored when GOMEMLIMIT is set"},
	{name: "rate-limit", kind: kInt, def: fmt.Sprint(DefaultRateLimit),
		usage: "`N` requests a second answered per source (an IPv6 /64 or an IPv4 address, PKT-08); beyond it (and the burst) requests are dropped"},
	{name: "rate-burst", kind: kInt, def: fmt.Sprint(DefaultRateBurst),
		usage: "`N` requests a source may send at once before --rate-limit applies"},
	{name: "kernel-rate-limit", kind: kInt,
		usage: "`N` datagrams a second per source above which the kernel drops requests before they reach pcpd (standalone mode; a flood then does not delay other clients), 0 = off; its burst is 4 × --rate-burst (default: 4 × --rate-limit)"},
	{name: "kernel-owner-rate-limit", kind: kInt,
		usage: "`N` datagrams a second per client (all its sources together, e.g. every /64 of a WireGuard peer's AllowedIPs) above which the kernel drops requests (standalone mode, with --kernel-rate-limit on); its burst is 2 × N (default: what pcpd's own per-client bucket admits, 8 × --rate-limit, burst 8 × --rate-burst, at least --kernel-rate-limit); the burst is never below --max-leases-per-client up to 2048, so a site renewing a client's whole quota at once is not cut (a burst above about 2500 lets one flooding client overflow pcpd's socket buffer on a one-core server)"},
	{name: "kernel-unowned-rate-limit", kind: kInt,
		usage: "`N` datagrams a second, all together, from the sources no client owns (outside every client's prefixes, or in a hole between WireGuard interfaces) above which the kernel drops requests (standalone mode, with --kernel-rate-limit on); pcpd refuses every request of theirs; its burst is 2 × N (default: what pcpd's own bucket for them admits, as one client's: 8 × --rate-limit, burst 8 × --rate-burst, at least the per-source meter's, whatever --kernel-owner-rate-limit says)"},
	{name: "kernel-reverse-path", kind: kString, def: ReversePathStrict,
		usage: "`MODE` of the kernel meter's reverse-path check on requests from a client's prefix (standalone mode, with --kernel-rate-limit on): strict (they must arrive on an interface the host routes that prefix through, every next hop of a multipath route counting, as rp_filter=1: requests spoofed from a client's prefix on another interface are dropped and cannot use up its rate), loose (some route back must exist, as rp_filter=2) or off; requests only: the guard's check of forwarded traffic from a client's address is always strict"},
	{name: "allow-ports", kind: kString,
		usage: "only these internal ports may be opened, `LIST` of ports and LOW-HIGH ranges, e.g. 22,80,443,1024-65535 (default: all)"},
	{name: "deny-ports", kind: kString,
		usage: "these internal ports are never opened, even if allowed, `LIST` of ports and LOW-HIGH ranges"},
	{name: "allow-all-ports", kind: kBool,
		usage: "grant TCP all-ports (port 0) mappings on IPv6 addresses (RFC 6887 §11: \"all ports\"); refused by default"},
	{name: "ipv4-port-range", kind: kString, def: DefaultIPv4PortRange,
		usage: "external IPv4 ports pcpd may allocate, `LOW-HIGH`"},
	{name: "reserved-ports", kind: kString,
		usage: "external IPv4 ports never allocated (TCP and UDP), `LIST` of ports and LOW-HIGH ranges, e.g. 8080,9000-9010; the host's listening ports and 5350-5351 are always kept (default: none more)"},
	{name: "metrics", kind: kString,
		usage: "serve Prometheus metrics at http://`ADDR`/metrics, e.g. 127.0.0.1:9351 (off unless given)"},
	{name: "log-level", kind: kString, def: "info",
		usage: "log `LEVEL`: debug (sampled per-packet detail), info (one line per decision), warn, error"},
	{name: "strict-nonce", kind: kBool,
		usage: "RFC 6887 strict nonce checks: a request with another nonce for an existing mapping gets NOT_AUTHORIZED; default: a new nonce from the same owner replaces the mapping, so a rebooted client is not locked out"},
	{name: "third-party", kind: kString, def: ThirdPartyOwned,
		usage: "THIRD_PARTY option `MODE`: owned (allowed only for addresses inside the requester's own prefixes, which adds no power) or off (answered UNSUPP_OPTION)"},
	{name: "disable-map", kind: kBool, usage: "refuse PCP MAP requests (NOT_AUTHORIZED)"},
	{name: "disable-peer", kind: kBool, usage: "refuse PCP PEER requests (NOT_AUTHORIZED)"},
	{name: "disable-natpmp", kind: kBool, usage: "do not answer NAT-PMP (RFC 6886) requests"},
}

// FlagConfig is the flag naming the config file.
const FlagConfig = "config"

// AddFlags registers --config and every setting's flag on fs.
func AddFlags(fs *pflag.FlagSet) {
	fs.String(FlagConfig, "", "TOML config `FILE`; every flag has a key of the same name, and flags given on the command line override it")
	for _, s := range settings {
		switch s.kind {
		case kString, kInt, kDuration:
			fs.String(s.name, s.def, s.usage)
		case kBool:
			fs.Bool(s.name, s.def == "true", s.usage)
		case kList:
			fs.StringArray(s.name, s.defs, s.usage)
		case kClients:
			fs.StringArray(s.name, nil, s.usage)
		}
	}
}

// value is one setting's raw value and where it came from.
type value struct {
	where   string // "--name", "FILE: name" or "default name", for messages
	str     string
	list    []string
	b       bool
	clients []client
}

// client is one static client before validation.
type client struct {
	where, name string
	prefixes    []string
}

// Load reads the config file named by --config (if any), lays the flags
// given on the command line over it and validates the result. The returned
// error is an Errors listing every mistake; nothing outside the file is read.
func Load(fs *pflag.FlagSet) (*Config, error) {
	vals := map[string]*value{}
	for _, s := range settings {
		vals[s.name] = &value{where: s.name, str: s.def, list: slices.Clone(s.defs), b: s.def == "true"}
	}
	var errs Errors
	file := ""
	if f := fs.Lookup(FlagConfig); f != nil {
		file = f.Value.String()
	}
	if file != "" {
		errs = append(errs, readFile(file, vals)...)
	}
	for _, s := range settings {
		f := fs.Lookup(s.name)
		if f == nil || !f.Changed {
			continue
		}
		v := &value{where: "--" + s.name}
		switch s.kind {
		case kString, kInt, kDuration:
			v.str = f.Value.String()
		case kBool:
			v.b, _ = fs.GetBool(s.name)
		case kList:
			v.list, _ = fs.GetStringArray(s.name)
		case kClients:
			arr, _ := fs.GetStringArray(s.name)
			for _, a := range arr {
				name, pfx, ok := strings.Cut(a, "=")
				if !ok {
					errs = append(errs, fmt.Errorf("config: --client %q: want NAME=PREFIX[,PREFIX...]: %w", a, ErrInvalid))
					continue
				}
				c := client{where: "--client", name: name}
				if pfx != "" {
					c.prefixes = strings.Split(pfx, ",")
				}
				v.clients = append(v.clients, c)
			}
		}
		vals[s.name] = v
	}
	cfg, verrs := validate(vals)
	errs = append(errs, verrs...)
	if len(errs) > 0 {
		return nil, errs
	}
	cfg.File = file
	return cfg, nil
}

// readFile decodes a TOML file into vals, checking each key's type. Unknown
// keys are mistakes (a misspelt key silently ignored is worse).
func readFile(path string, vals map[string]*value) Errors {
	// Whoever can change the file decides who owns which prefixes. The
	// path is checked before it is opened (review h/revfsperm2: opened
	// first, as root, a refused path could still be a FIFO that hangs
	// the open, a device with effects on open, or another user's file);
	// once every name on the way is trusted (fsperm), nobody else can
	// make it lead elsewhere before the open below.
	if err := fsperm.File(path); err != nil {
		var errno syscall.Errno
		if !errors.Is(err, fsperm.ErrUnsafe) && errors.As(err, &errno) {
			// Missing, or not searchable: as open would say it.
			return Errors{fmt.Errorf("config: read config file: %w", &fs.PathError{Op: "open", Path: path, Err: errno})}
		}
		return Errors{fmt.Errorf("config: config file %s: %w: %w", path, err, ErrInvalid)}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Errors{fmt.Errorf("config: read config file: %w", err)}
	}
	var m map[string]any
	if _, err := toml.Decode(string(data), &m); err != nil {
		// toml's messages carry line and column; keep them on one line.
		return Errors{fmt.Errorf("config: %s: %s: %w", path, strings.Join(strings.Fields(err.Error()), " "), ErrInvalid)}
	}
	var errs Errors
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		raw := m[k]
		i := slices.IndexFunc(settings, func(s setting) bool { return s.name == k })
		if i < 0 || k == FlagConfig {
			errs = append(errs, fmt.Errorf("config: %s: unknown key %q: %w", path, k, ErrInvalid))
			continue
		}
		s := settings[i]
		where := path + ": " + k
		v := &value{where: where}
		bad := func(want string) {
			errs = append(errs, fmt.Errorf("config: %s: want %s, got %s: %w", where, want, tomlType(raw), ErrInvalid))
		}
		switch s.kind {
		case kString, kDuration:
			str, ok := raw.(string)
			if !ok {
				if s.kind == kDuration {
					bad(`a duration string such as "90s" or "2h"`)
				} else {
					bad("a string")
				}
				continue
			}
			v.str = str
		case kInt:
			n, ok := raw.(int64)
			if !ok {
				bad("an integer")
				continue
			}
			v.str = fmt.Sprint(n)
		case kBool:
			b, ok := raw.(bool)
			if !ok {
				bad("true or false")
				continue
			}
			v.b = b
		case kList:
			list, ok := stringList(raw)
			if !ok {
				bad("an array of strings")
				continue
			}
			v.list = list
		case kClients:
			tbl, ok := raw.(map[string]any)
			if !ok {
				bad(`a table of client names to prefix arrays ([client] name = ["2001:db8:1::/48"])`)
				continue
			}
			names := make([]string, 0, len(tbl))
			for n := range tbl {
				names = append(names, n)
			}
			slices.Sort(names)
			for _, n := range names {
				list, ok := stringList(tbl[n])
				if !ok {
					errs = append(errs, fmt.Errorf("config: %s.%s: want an array of prefix strings, got %s: %w", where, n, tomlType(tbl[n]), ErrInvalid))
					continue
				}
				v.clients = append(v.clients, client{where: where + "." + n, name: n, prefixes: list})
			}
		}
		vals[k] = v
	}
	return errs
}

// stringList accepts an array of strings, or one string as a one-element list.
func stringList(raw any) ([]string, bool) {
	switch x := raw.(type) {
	case string:
		return []string{x}, true
	case []any:
		out := make([]string, 0, len(x))
		for _, e := range x {
			s, ok := e.(string)
			if !ok {
				return nil, false
			}
			out = append(out, s)
		}
		return out, true
	}
	return nil, false
}

func tomlType(raw any) string {
	switch x := raw.(type) {
	case string:
		return fmt.Sprintf("string %q", x)
	case int64:
		return fmt.Sprintf("integer %d", x)
	case float64:
		return fmt.Sprintf("float %v", x)
	case bool:
		return fmt.Sprintf("boolean %v", x)
	case []any:
		return "an array"
	case map[string]any:
		return "a table"
	}
	return fmt.Sprintf("%T", raw)
}

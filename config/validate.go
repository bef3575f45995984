package config

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/pcpd/pcpd/policy"
)

// maxSocketPath is sun_path's size minus its terminating NUL.
const maxSocketPath = 107

// maxIfName is the longest interface name: an alternative name ("ip link
// property add dev wg0 altname ...") holds ALTIFNAMSIZ (128) bytes with
// its NUL; a kernel name IFNAMSIZ (16). pcpd resolves either to the kernel
// name wherever that is what counts (internal/ifname).
const maxIfName = 127

// validate turns raw values into a Config, collecting one error per mistake.
func validate(vals map[string]*value) (*Config, Errors) {
	var errs Errors
	fail := func(v *value, format string, args ...any) {
		errs = append(errs, fmt.Errorf("config: %s: %s: %w", v.where, fmt.Sprintf(format, args...), ErrInvalid))
	}
	c := &Config{}

	// Interfaces.
	iv := vals["interface"]
	if len(iv.list) == 0 {
		fail(iv, "at least one interface is needed")
	}
	for _, name := range iv.list {
		switch {
		case name == "" || len(name) > maxIfName:
			fail(iv, "%q is not an interface name (1-%d bytes: a kernel name of at most 15, or an altname)", name, maxIfName)
		case strings.ContainsAny(name, "/: \t") || name == "." || name == "..":
			fail(iv, "%q is not an interface name (no '/', ':' or spaces)", name)
		case slices.Contains(c.Interfaces, name):
			fail(iv, "%q given twice", name)
		default:
			c.Interfaces = append(c.Interfaces, name)
		}
	}

	// Listen addresses.
	lv := vals["listen"]
	for _, s := range lv.list {
		ap, err := parseListen(s)
		switch {
		case err != nil:
			fail(lv, "%q: %v", s, err)
		case slices.Contains(c.Listen, ap):
			fail(lv, "%q given twice", s)
		default:
			c.Listen = append(c.Listen, ap)
		}
	}

	// Static clients.
	cv := vals["client"]
	clientsOK := true
	for _, cl := range cv.clients {
		w := &value{where: cl.where}
		if !validName(cl.name) {
			fail(w, "client name %q: use letters, digits, '.', '_' or '-' (at most 64)", cl.name)
			clientsOK = false
			continue
		}
		if _, dup := c.Clients[cl.name]; dup {
			fail(w, "client %q given twice", cl.name)
			clientsOK = false
			continue
		}
		if len(cl.prefixes) == 0 {
			fail(w, "client %q owns no prefix", cl.name)
			clientsOK = false
			continue
		}
		var pfx []netip.Prefix
		for _, s := range cl.prefixes {
			p, err := parsePrefix(s)
			if err != nil {
				fail(w, "client %q: %v", cl.name, err)
				clientsOK = false
				continue
			}
			pfx = append(pfx, p)
		}
		if c.Clients == nil {
			c.Clients = map[string][]netip.Prefix{}
		}
		c.Clients[cl.name] = pfx
	}
	if clientsOK && len(c.Clients) > 0 {
		// policy owns the rules for what may be owned (too short,
		// overlapping clients); ask it now rather than at start-up.
		if _, err := policy.NewStatic(c.Clients); err != nil {
			msg := strings.TrimPrefix(err.Error(), "policy: ")
			for _, sentinel := range []error{policy.ErrInvalidConfig, policy.ErrOverlap, policy.ErrShortPrefix} {
				msg = strings.TrimSuffix(msg, ": "+sentinel.Error())
			}
			fail(cv, "%s", msg)
		}
	}

	// Translation prefixes.
	nv := vals["nat64-prefix"]
	for _, s := range nv.list {
		p, err := parsePrefix(s)
		switch {
		case err != nil:
			fail(nv, "%v", err)
		case !p.Addr().Is6() || p.Addr().Is4In6():
			fail(nv, "%q is not an IPv6 prefix", s)
		case !slices.Contains([]int{32, 40, 48, 56, 64, 96}, p.Bits()):
			// RFC 6052 §2.2: where the IPv4 address goes depends on the
			// length; no translator embeds it after another.
			fail(nv, "%q: a translation prefix is a /32, /40, /48, /56, /64 or /96 (RFC 6052)", s)
		case slices.Contains(c.NAT64Prefixes, p):
			fail(nv, "%q given twice", s)
		default:
			c.NAT64Prefixes = append(c.NAT64Prefixes, p)
		}
	}

	// External IPv4.
	if ev := vals["external-ipv4"]; ev.str != "" {
		a, err := netip.ParseAddr(ev.str)
		a = a.Unmap()
		switch {
		case err != nil || !a.Is4():
			fail(ev, "%q is not an IPv4 address", ev.str)
		case !a.IsGlobalUnicast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
			fail(ev, "%s is not a unicast address others can reach", a)
		default:
			c.ExternalIPv4 = a
		}
	}

	// nftables.
	tv := vals["nft-table"]
	if !validName(tv.str) {
		fail(tv, "%q is not a table name: use letters, digits, '.', '_' or '-' (at most 64)", tv.str)
	}
	c.NftTable = tv.str
	if av := vals["nft-attach"]; av.str != "" {
		if !validName(av.str) {
			fail(av, "%q is not a table name: use letters, digits, '.', '_' or '-' (at most 64)", av.str)
		}
		c.NftAttach = av.str
	}
	hv := vals["nft-chain"]
	if !validName(hv.str) {
		fail(hv, "%q is not a chain name: use letters, digits, '.', '_' or '-' (at most 64)", hv.str)
	}
	c.NftChain = hv.str
	c.NftNotrack = vals["nft-notrack"].b

	// Paths.
	sv := vals["state-dir"]
	if !filepath.IsAbs(sv.str) {
		fail(sv, "%q is not an absolute path", sv.str)
	}
	c.StateDir = filepath.Clean(sv.str)
	kv := vals["socket"]
	switch {
	case !filepath.IsAbs(kv.str):
		fail(kv, "%q is not an absolute path", kv.str)
	case len(kv.str) > maxSocketPath:
		fail(kv, "path is %d bytes, a unix socket path holds at most %d", len(kv.str), maxSocketPath)
	case strings.HasSuffix(kv.str, "/"):
		fail(kv, "%q names a directory, not a socket", kv.str)
	}
	c.Socket = filepath.Clean(kv.str)

	// Lifetimes.
	var minOK, maxOK bool
	c.MinLifetime, minOK = parseDuration(vals["min-lifetime"], fail)
	c.MaxLifetime, maxOK = parseDuration(vals["max-lifetime"], fail)
	if mv := vals["max-lifetime"]; maxOK && c.MaxLifetime > policy.LongestMaxLifetime {
		// Not the 32-bit PCP field's 136 years: every lease is a kernel
		// element whose timeout pcpd keeps within a year.
		fail(mv, "%v exceeds %v (365 days), the longest lease pcpd grants (its pinholes' kernel timeouts)", c.MaxLifetime, policy.LongestMaxLifetime)
		maxOK = false
	}
	if minOK && maxOK && c.MinLifetime > c.MaxLifetime {
		fail(vals["min-lifetime"], "%v is longer than max-lifetime %v", c.MinLifetime, c.MaxLifetime)
	}

	// Quotas.
	var perOK, allOK bool
	c.MaxLeasesPerClient, perOK = parseCount(vals["max-leases-per-client"], fail)
	c.MaxLeases, allOK = parseCount(vals["max-leases"], fail)
	if perOK && allOK && c.MaxLeasesPerClient > c.MaxLeases {
		fail(vals["max-leases-per-client"], "%d exceeds max-leases %d", c.MaxLeasesPerClient, c.MaxLeases)
	}

	// Memory limit: auto follows max-leases.
	mv := vals["memory-limit"]
	if strings.TrimSpace(mv.str) == MemoryLimitAuto {
		if allOK {
			c.MemoryLimit = MemoryLimitBase + MemoryLimitPerLease*int64(c.MaxLeases)
		}
	} else if n, ok := parseSize(mv.str); ok {
		c.MemoryLimit = n
	} else {
		fail(mv, "%q: want auto, 0 (no limit), or a size such as 512MiB or 2G", mv.str)
	}

	// Rate limit per source.
	c.RateLimit, _ = parseCount(vals["rate-limit"], fail)
	c.RateBurst, _ = parseCount(vals["rate-burst"], fail)
	quotaBurst := min(c.MaxLeasesPerClient, QuotaBurstCap)
	c.OwnerRateBurst = max(policy.OwnerRateFactor*c.RateBurst, quotaBurst)
	c.KernelRateBurst = KernelRateFactor * c.RateBurst
	if kv := vals["kernel-rate-limit"]; kv.str == "" {
		c.KernelRateLimit = KernelRateFactor * c.RateLimit
	} else if n, err := strconv.Atoi(kv.str); err != nil || n < 0 || n > 1<<24 {
		fail(kv, "%q: want 0 (off) or a whole number up to %d", kv.str, 1<<24)
	} else if n != 0 && n < c.RateLimit {
		// The meter would drop requests pcpd's own limiter answers.
		fail(kv, "%d is below rate-limit %d", n, c.RateLimit)
	} else {
		c.KernelRateLimit = n
	}

	if kv := vals["kernel-owner-rate-limit"]; kv.str == "" {
		if c.KernelRateLimit != 0 {
			// What pcpd's own per-owner bucket admits (server, ownerGate)
			// and no more: the kernel meter's owner share beyond it was
			// only read and dropped, and on a one-core server its burst
			// of 3200 overflowed the socket buffer, others' requests
			// with it (RELIABILITY.md known bug 5). Never below one
			// source's own meter.
			c.KernelOwnerRateLimit = max(policy.OwnerRateFactor*c.RateLimit, c.KernelRateLimit)
			c.KernelOwnerRateBurst = max(c.OwnerRateBurst, c.KernelRateBurst)
		}
	} else if n, err := strconv.Atoi(kv.str); err != nil || n < 1 || n > 1<<24 {
		fail(kv, "%q: want a whole number from 1 to %d", kv.str, 1<<24)
	} else if c.KernelRateLimit == 0 {
		// The owner chains hang off the per-source meter's rules: with
		// that meter off nothing jumps to them, and the setting would
		// silently do nothing.
		fail(kv, "needs the kernel meter (kernel-rate-limit is 0)")
	} else if n < c.KernelRateLimit {
		// One source alone would be held below its own meter.
		fail(kv, "%d is below kernel-rate-limit %d", n, c.KernelRateLimit)
	} else {
		// Nor one source's burst below its own meter's.
		c.KernelOwnerRateLimit, c.KernelOwnerRateBurst = n, max(2*n, c.KernelRateBurst, quotaBurst)
	}
	// Either way the owner's burst is at least its quota, as pcpd's own
	// owner bucket's (OwnerRateBurst): a site whose hosts renew all of a
	// client's leases at once (after an outage, a router's reboot) sends
	// that many requests back to back. With both bursts fixed at 800 an
	// explicit --max-leases-per-client above it lost the excess,
	// unanswered: in the kernel, and in pcpd's bucket, which binds once
	// such a burst fills the queue to 1/8 (TestSiteRenewsAtOncePKT08: 807
	// of 1 200 answered with the kernel's burst alone raised). The price: a flooding client gets that much more
	// into pcpd's socket at once; past about 2 500 small datagrams it
	// overflows the 2 MiB buffer on a one-core server (known bug 5), so
	// the quota raises the bursts only up to QuotaBurstCap: a quota set
	// to max-leases (no per-client quota) must not take the per-client
	// flood limit away with it. An explicit --rate-burst or
	// --kernel-owner-rate-limit above it is the operator's own choice.

	// The sources no client owns share one kernel bucket (review S4):
	// pcpd's own limiter gives them one client's bucket (server/early.go),
	// and every request of theirs is refused, so by default the kernel
	// admits what that bucket does and a flood from many unowned /64s no
	// longer reaches the socket at full speed. Not tied to an explicit
	// --kernel-owner-rate-limit: raising it for one client that stands for
	// many hosts must not let the unowned through with it.
	if kv := vals["kernel-unowned-rate-limit"]; kv.str == "" {
		if c.KernelRateLimit != 0 {
			c.KernelUnownedRateLimit = max(policy.OwnerRateFactor*c.RateLimit, c.KernelRateLimit)
			c.KernelUnownedRateBurst = max(c.OwnerRateBurst, c.KernelRateBurst)
		}
	} else if n, err := strconv.Atoi(kv.str); err != nil || n < 1 || n > 1<<24 {
		fail(kv, "%q: want a whole number from 1 to %d", kv.str, 1<<24)
	} else if c.KernelRateLimit == 0 {
		fail(kv, "needs the kernel meter (kernel-rate-limit is 0)")
	} else {
		// Below the per-source meter is allowed: these sources are only
		// ever refused, and one of them alone may be held below it.
		c.KernelUnownedRateLimit, c.KernelUnownedRateBurst = n, 2*n
	}

	switch kv := vals["kernel-reverse-path"]; kv.str {
	case ReversePathStrict, ReversePathLoose, ReversePathOff:
		c.KernelReversePath = kv.str
	default:
		fail(kv, "%q: want strict, loose or off", kv.str)
	}

	// IPv4 port range.
	rv := vals["ipv4-port-range"]
	lo, hi, ok := parsePortRange(rv.str)
	if !ok {
		fail(rv, "%q: want LOW-HIGH with 1 <= LOW <= HIGH <= 65535", rv.str)
	}
	c.IPv4PortLow, c.IPv4PortHigh = lo, hi

	// Port rules.
	c.AllowPorts, _ = parsePortList(vals["allow-ports"], fail)
	c.DenyPorts, _ = parsePortList(vals["deny-ports"], fail)
	c.AllowAllPorts = vals["allow-all-ports"].b
	if av := vals["allow-all-ports"]; c.AllowAllPorts {
		// An all-ports mapping opens every port: the policy grants none
		// while the port rules keep one closed (UNSUPP_PROTOCOL, MAP-05),
		// so the switch would be silently ineffective. Rules that close
		// nothing (allow-ports = "1-65535") are fine.
		if p, ok := closedPort(c.AllowPorts, c.DenyPorts); ok {
			fail(av, "contradicts allow-ports/deny-ports, which keep port %d (and maybe more) closed: an all-ports mapping would open it too, so none would ever be granted; drop allow-all-ports or the port rules", p)
		}
	}

	// Reserved external IPv4 ports.
	if rv := vals["reserved-ports"]; rv.str != "" {
		if list, ok := parsePortList(rv, fail); ok {
			c.ReservedPorts = reservedPorts(rv, list, c.IPv4PortLow, c.IPv4PortHigh, fail)
		}
	}

	// WireGuard: 0 (no grace) or whole seconds up to an hour; a longer
	// grace keeps the pinholes of peers removed for good open as long.
	wv := vals["wireguard-gone-grace"]
	if d, err := time.ParseDuration(wv.str); err != nil || d != 0 {
		if d, ok := parseDuration(wv, fail); ok {
			if d > time.Hour {
				fail(wv, "%v is longer than 1h", d)
			}
			c.WireGuardGoneGrace = d
		}
	}

	// WireGuard: 0 (a read per THIRD_PARTY request) or whole seconds up
	// to the periodic read's 5 s, beyond which it changes nothing.
	fv := vals["wireguard-fresh"]
	if d, err := time.ParseDuration(fv.str); err != nil || d != 0 {
		if d, ok := parseDuration(fv, fail); ok {
			if d > 5*time.Second {
				fail(fv, "%v is longer than 5s (the periodic read's interval)", d)
			}
			c.WireGuardFresh = d
		}
	}

	// Store housekeeping.
	c.TouchInterval, _ = parseDuration(vals["touch-interval"], fail)
	c.SnapshotInterval, _ = parseDuration(vals["snapshot-interval"], fail)
	c.FirewallCheckInterval, _ = parseDuration(vals["firewall-check-interval"], fail)
	c.FirewallWatch = vals["firewall-watch"].b

	// Metrics.
	if mv := vals["metrics"]; mv.str != "" {
		host, port, err := net.SplitHostPort(mv.str)
		if n, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil || n == 0 {
			fail(mv, "%q: want HOST:PORT, e.g. 127.0.0.1:9351 or [::1]:9351", mv.str)
		} else if host != "" && host != "localhost" {
			if _, err := netip.ParseAddr(host); err != nil {
				fail(mv, "%q: host must be an IP address or localhost", mv.str)
			}
		}
		c.Metrics = mv.str
	}

	// Logging.
	gv := vals["log-level"]
	switch gv.str {
	case "debug", "info", "warn", "error":
		c.LogLevel, _ = zapcore.ParseLevel(gv.str)
	default:
		fail(gv, "%q: want debug, info, warn or error", gv.str)
	}

	// Protocol switches.
	pv := vals["third-party"]
	switch pv.str {
	case ThirdPartyOff, ThirdPartyOwned:
		c.ThirdParty = pv.str
	default:
		fail(pv, "%q: want owned or off", pv.str)
	}
	c.StrictNonce = vals["strict-nonce"].b
	c.DisableMap = vals["disable-map"].b
	c.DisablePeer = vals["disable-peer"].b
	c.DisableNATPMP = vals["disable-natpmp"].b
	return c, errs
}

// validName accepts names that are safe in logs, nftables and file keys.
func validName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// parseListen accepts "host" or "[host]:port" / "a.b.c.d:port"; the host
// must be a literal address of this machine's interfaces, never a wildcard:
// a wildcard socket would answer on every interface (SEC-01).
func parseListen(s string) (netip.AddrPort, error) {
	var ap netip.AddrPort
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		ap = netip.AddrPortFrom(a, DefaultPort)
	} else if ap, err = netip.ParseAddrPort(s); err != nil {
		return ap, fmt.Errorf("want an IP address, or [address]:port")
	}
	a := ap.Addr().Unmap()
	switch {
	case a.IsUnspecified():
		return ap, fmt.Errorf("a wildcard address would answer on every interface; name the interfaces with --interface instead")
	case a.IsMulticast():
		return ap, fmt.Errorf("multicast is not a listen address")
	case ap.Port() == 0:
		return ap, fmt.Errorf("port 0 is not a listen port")
	}
	return netip.AddrPortFrom(a, ap.Port()), nil
}

// parsePrefix accepts a prefix or a single address (a /32 or /128), and
// masks host bits.
func parsePrefix(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if p, err := netip.ParsePrefix(s); err == nil {
		if p.Addr().Zone() != "" {
			return p, fmt.Errorf("prefix %q has a zone", s)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is not a prefix (e.g. 2001:db8:1::/48) or address", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func parseDuration(v *value, fail func(*value, string, ...any)) (time.Duration, bool) {
	d, err := time.ParseDuration(v.str)
	switch {
	case err != nil:
		fail(v, "%q is not a duration (e.g. 90s, 2h, 24h)", v.str)
		return 0, false
	case d < time.Second:
		fail(v, "%v is shorter than one second", d)
		return 0, false
	case d%time.Second != 0:
		fail(v, "%v is not a whole number of seconds (PCP lifetimes are in seconds)", d)
		return 0, false
	}
	return d, true
}

func parseCount(v *value, fail func(*value, string, ...any)) (int, bool) {
	n, err := strconv.Atoi(v.str)
	if err != nil || n < 1 || n > 1<<24 {
		fail(v, "%q: want a whole number from 1 to %d", v.str, 1<<24)
		return 0, false
	}
	return n, true
}

// parsePortList parses a LIST of ports and LOW-HIGH ranges separated by
// commas; "" is no list (nil, true).
func parsePortList(v *value, fail func(*value, string, ...any)) ([][2]uint16, bool) {
	if v.str == "" {
		return nil, true
	}
	var list [][2]uint16
	for _, part := range strings.Split(v.str, ",") {
		lo, hi, ok := parsePortRange(part)
		if !ok {
			fail(v, "%q: want ports and LOW-HIGH ranges separated by commas, e.g. 22,80,1024-65535", part)
			return nil, false
		}
		list = append(list, [2]uint16{lo, hi})
	}
	return list, true
}

// reservedPorts expands the reserved ranges into sorted ports without
// repeats (overlapping ranges are fine). Any number is fine (the engine
// keeps them as a 65 536-bit set); it refuses a list that leaves nothing
// of the IPv4 port range [low, high] (zero when that range is invalid) to
// allocate.
func reservedPorts(v *value, ranges [][2]uint16, low, high uint16, fail func(*value, string, ...any)) []uint16 {
	var n int
	for _, r := range ranges {
		n += int(r[1]) - int(r[0]) + 1
	}
	ports := make([]uint16, 0, n)
	for _, r := range ranges {
		for p := int(r[0]); p <= int(r[1]); p++ {
			ports = append(ports, uint16(p))
		}
	}
	slices.Sort(ports)
	ports = slices.Compact(ports)
	if low != 0 {
		free := int(high) - int(low) + 1
		for _, p := range ports {
			if p >= low && p <= high {
				free--
			}
		}
		if free == 0 {
			fail(v, "reserves every port of ipv4-port-range %d-%d: no IPv4 mapping could be made", low, high)
			return nil
		}
	}
	return ports
}

// closedPort returns the lowest port (1-65535) that allow (all when
// empty) minus deny keeps closed, if any.
func closedPort(allow, deny [][2]uint16) (uint16, bool) {
	var open [65536]bool
	if len(allow) == 0 {
		allow = [][2]uint16{{1, 65535}}
	}
	for _, r := range allow {
		for p := int(r[0]); p <= int(r[1]); p++ {
			open[p] = true
		}
	}
	for _, r := range deny {
		for p := int(r[0]); p <= int(r[1]); p++ {
			open[p] = false
		}
	}
	for p := 1; p <= 65535; p++ {
		if !open[p] {
			return uint16(p), true
		}
	}
	return 0, false
}

func parsePortRange(s string) (lo, hi uint16, ok bool) {
	a, b, found := strings.Cut(s, "-")
	if !found {
		b = a
	}
	l, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 16)
	h, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 16)
	if err1 != nil || err2 != nil || l == 0 || l > h {
		return 0, 0, false
	}
	return uint16(l), uint16(h), true
}

// parseSize reads a byte count: digits with an optional binary suffix K,
// KiB, M, MiB, G or GiB (any case, B optional). A size under 1 MiB other
// than 0 is refused: the runtime could not work within it.
func parseSize(s string) (int64, bool) {
	s = strings.ToLower(strings.TrimSpace(s))
	s = strings.TrimSuffix(strings.TrimSuffix(s, "b"), "i")
	shift := 0
	switch {
	case strings.HasSuffix(s, "k"):
		shift = 10
	case strings.HasSuffix(s, "m"):
		shift = 20
	case strings.HasSuffix(s, "g"):
		shift = 30
	}
	if shift > 0 {
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || n < 0 || n > (1<<62)>>shift {
		return 0, false
	}
	n <<= shift
	return n, n == 0 || n >= 1<<20
}

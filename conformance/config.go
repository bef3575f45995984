package conformance

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// ErrConfig marks a bad target description.
var ErrConfig = errors.New("conformance: bad target configuration")

// Flags registers the target description on fs, each flag defaulting to
// the environment variable named beside it, so `go test` (environment)
// and pcp-conformance (flags) describe a target the same way. Call
// Finish after fs.Parse.
//
//	-server    PCP_SERVER         PCP server address, host or [host]:port (required)
//	-client    PCP_CLIENT         local address to send from (default: chosen by routing)
//	-server-alt PCP_SERVER_ALT    a second address of the same server
//	-server4   PCP_SERVER4        IPv4 server address (IPv4 mappings, NAT-PMP)
//	-client4   PCP_CLIENT4        local IPv4 address (default: chosen by routing)
//	-external-ipv4 PCP_EXTERNAL_IPV4  the target's external IPv4
//	-natpmp    PCP_NATPMP         the target serves NAT-PMP on -server4
//	-third-party PCP_THIRD_PARTY  second owned address for THIRD_PARTY (unset: TP must be refused)
//	-other-client PCP_OTHER_CLIENT, -other-client4 PCP_OTHER_CLIENT4  another client's addresses we can send from
//	-not-owned PCP_NOT_OWNED      an address we can send from that no client owns
//	-nonce-replaces PCP_NONCE_REPLACES  the target replaces mappings on a new nonce (pcpd default)
//	-filter-limit PCP_FILTER_LIMIT, -quota PCP_QUOTA, -min-lifetime PCP_MIN_LIFETIME, -timeout PCP_TIMEOUT
func Flags(fs *flag.FlagSet) *Target {
	t := &Target{}
	s := func(p *string, name, env, usage string) {
		fs.StringVar(p, name, os.Getenv(env), usage+" (env "+env+")")
	}
	s(&t.server, "server", "PCP_SERVER", "PCP server address, host or [host]:port")
	s(&t.client, "client", "PCP_CLIENT", "local address to send from (default: chosen by routing)")
	s(&t.serverAlt, "server-alt", "PCP_SERVER_ALT", "a second address of the same server (HDR-02)")
	s(&t.server4, "server4", "PCP_SERVER4", "IPv4 server address for IPv4 mappings and NAT-PMP")
	s(&t.client4, "client4", "PCP_CLIENT4", "local IPv4 address (default: chosen by routing)")
	s(&t.ext4, "external-ipv4", "PCP_EXTERNAL_IPV4", "the target's external IPv4 (unset: IPv4 mappings must be refused)")
	s(&t.natpmp, "natpmp", "PCP_NATPMP", "1 if the target serves NAT-PMP on -server4")
	s(&t.tp, "third-party", "PCP_THIRD_PARTY", "a second address we own, for THIRD_PARTY (unset: THIRD_PARTY must be refused)")
	s(&t.other, "other-client", "PCP_OTHER_CLIENT", "another client's address we can send from")
	s(&t.other4, "other-client4", "PCP_OTHER_CLIENT4", "another client's IPv4 address we can send from")
	s(&t.notOwned, "not-owned", "PCP_NOT_OWNED", "an address we can send from that no client owns")
	s(&t.nonce, "nonce-replaces", "PCP_NONCE_REPLACES", "1 if a new nonce from the owner replaces a mapping (pcpd's default); else RFC strict")
	s(&t.filters, "filter-limit", "PCP_FILTER_LIMIT", "the target's FILTER limit per mapping (0: unknown)")
	s(&t.quota, "quota", "PCP_QUOTA", "the per-client mapping limit (0: none)")
	s(&t.minLife, "min-lifetime", "PCP_MIN_LIFETIME", "the target's minimum lifetime, e.g. 120s")
	s(&t.timeout, "timeout", "PCP_TIMEOUT", "reply timeout per transmission, e.g. 1s")
	return t
}

// Target holds the flag values until Finish turns them into an Env.
type Target struct {
	server, client, serverAlt, server4, client4, ext4, natpmp, tp, other, other4, notOwned string
	nonce, filters, quota, minLife, timeout                                                string
}

// Set reports whether a server was given.
func (t *Target) Set() bool { return t.server != "" }

// Finish validates the values and returns the Env.
func (t *Target) Finish() (*Env, error) {
	var errs []error
	addr := func(s, what string) netip.Addr {
		if s == "" {
			return netip.Addr{}
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("conformance: %s %q: %w", what, s, ErrConfig))
		}
		return a.Unmap()
	}
	server := func(s, what string) netip.AddrPort {
		if s == "" {
			return netip.AddrPort{}
		}
		if ap, err := netip.ParseAddrPort(s); err == nil {
			return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		a := addr(strings.Trim(s, "[]"), what)
		return netip.AddrPortFrom(a, 5351)
	}
	flagBool := func(s string) bool { b, _ := strconv.ParseBool(s); return b }
	num := func(s, what string) int {
		if s == "" {
			return 0
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			errs = append(errs, fmt.Errorf("conformance: %s %q: %w", what, s, ErrConfig))
		}
		return n
	}
	dur := func(s, what string) time.Duration {
		if s == "" {
			return 0
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("conformance: %s %q: %w", what, s, ErrConfig))
		}
		return d
	}
	e := &Env{
		Server:        server(t.server, "server"),
		Client:        addr(t.client, "client"),
		ServerAlt:     server(t.serverAlt, "server-alt"),
		Server4:       server(t.server4, "server4"),
		Client4:       addr(t.client4, "client4"),
		ExternalV4:    addr(t.ext4, "external-ipv4"),
		NATPMP:        flagBool(t.natpmp),
		ThirdParty:    addr(t.tp, "third-party"),
		OtherClient:   addr(t.other, "other-client"),
		OtherClient4:  addr(t.other4, "other-client4"),
		NotOwned:      addr(t.notOwned, "not-owned"),
		NonceReplaces: flagBool(t.nonce),
		FilterLimit:   num(t.filters, "filter-limit"),
		Quota:         num(t.quota, "quota"),
		MinLifetime:   dur(t.minLife, "min-lifetime"),
		Timeout:       dur(t.timeout, "timeout"),
	}
	if !e.Server.IsValid() {
		errs = append(errs, fmt.Errorf("conformance: no server (-server or PCP_SERVER): %w", ErrConfig))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if !e.Client.IsValid() {
		e.Client = localFor(e.Server)
	}
	if e.Server4.IsValid() && !e.Client4.IsValid() {
		e.Client4 = localFor(e.Server4)
	}
	switch {
	case !e.Client.IsValid():
		errs = append(errs, fmt.Errorf("conformance: no local address routes to %s: %w", e.Server, ErrConfig))
	case e.Client.Is4() != e.Server.Addr().Is4():
		errs = append(errs, fmt.Errorf("conformance: client %s and server %s differ in family: %w", e.Client, e.Server, ErrConfig))
	case e.Server4.IsValid() && !e.Server4.Addr().Is4():
		errs = append(errs, fmt.Errorf("conformance: server4 %s is not IPv4: %w", e.Server4, ErrConfig))
	}
	return e, errors.Join(errs...)
}

// localFor returns the source address the system would use towards a.
func localFor(a netip.AddrPort) netip.Addr {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(a))
	if err != nil {
		return netip.Addr{}
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
}

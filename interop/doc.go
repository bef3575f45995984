// Package interop runs clients pcpd did not write against the real daemon
// in netlab's namespace topology, and checks that every mapping really
// carries traffic from the internet namespace to the client (issue 7,
// "Interop with real clients"):
//
//   - TestNatpmpc: Debian's natpmpc (libnatpmp): public address, TCP and
//     UDP map and delete, delete-all.
//   - TestGoNatPmp: github.com/jackpal/go-nat-pmp: external address, TCP
//     and UDP map and delete.
//   - TestTailscalePortmapperPCP: Tailscale's PCP client
//     (tailscale.com/net/portmapper), built from the nested module
//     ./tsportmap so its dependencies stay out of pcpd's go.mod.
//   - TestStartOSExchange: the exchange StartOS makes, with pcp's client,
//     over IPv6 and IPv4.
//
// The package is test-only. Its tests need root (namespaces, nftables) and
// skip without it, or when natpmpc is not installed, or when Tailscale's
// module cannot be fetched: sudo go test ./interop/
package interop

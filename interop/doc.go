// Package interop runs clients pcpd did not write (Debian's natpmpc,
// github.com/jackpal/go-nat-pmp) and a StartOS-shaped PCP exchange against
// the real daemon in a namespace topology, and checks that every mapping
// really carries traffic from the internet to the client (issue 7,
// "Interop with real clients"). The package is test-only; its tests need
// root and skip without it.
package interop

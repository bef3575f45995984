// Package reliability holds pcpd's fault-injection and hostile-client tests
// (issue 9). It has no code of its own: every test builds the real pcpd
// binary once, runs it inside throwaway network namespaces (internal/netlab)
// and judges it by what the kernel holds (pcpd's nftables set elements),
// what real TCP traffic does, what `pcpd leases --json` lists and what the
// daemon logs — never by its responses alone.
//
// The tests need root (namespaces, nftables, tmpfs and bind mounts) and skip
// with a message otherwise. RELIABILITY.md at the repository root lists each
// test, the property it proves, its measured figures and the command that
// reruns it. PCPD_LONG=1 runs more kill -9 cycles; PCPD_SOAK=10m makes the
// soak test longer.
package reliability

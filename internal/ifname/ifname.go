// Package ifname resolves a configured interface name, the kernel's name
// or one of the interface's alternative names ("ip link property add dev
// wg0 altname ...", up to 127 bytes; systemd gives every NIC some), to the
// interface's kernel name.
//
// Much of what pcpd asks about an interface takes the kernel name only:
// SO_BINDTODEVICE and kernel WireGuard's genetlink take at most IFNAMSIZ-1
// (15) bytes, userspace WireGuard's control socket is
// /var/run/wireguard/KERNELNAME.sock, and nftables' "meta iifname" matches
// the kernel name alone. Resolve at the time of use: an interface can be
// renamed, or deleted and re-created with the same altname.
package ifname

import (
	"errors"

	"github.com/vishvananda/netlink"
)

// Kernel returns the kernel name of the interface that answers to name in
// the calling thread's network namespace (LinkByName asks the kernel by
// IFLA_ALT_IFNAME for names over 15 bytes). found is false, with a nil
// error, when no interface there answers to name.
func Kernel(name string) (kname string, found bool, err error) {
	kname, _, found, err = Lookup(name)
	return kname, found, err
}

// Lookup is Kernel that also returns the interface's index (0 when not
// found), from the same answer of the kernel.
func Lookup(name string) (kname string, index int, found bool, err error) {
	lnk, err := netlink.LinkByName(name)
	if err != nil {
		if _, ok := errors.AsType[netlink.LinkNotFoundError](err); ok {
			return "", 0, false, nil
		}
		return "", 0, false, err
	}
	return lnk.Attrs().Name, lnk.Attrs().Index, true, nil
}

package netlab

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// NetlinkSocket is one netlink socket open in a network namespace.
type NetlinkSocket struct {
	Protocol int    // NETLINK_ROUTE, NETLINK_NETFILTER, …
	Inode    uint64 // tells one socket from another across listings
}

// NetlinkSockets lists the netlink sockets open in the calling thread's
// network namespace, any process's (/proc/thread-self/net/netlink): run it
// inside NS.Do, in a namespace of the test's own.
func NetlinkSockets() ([]NetlinkSocket, error) {
	f, err := os.Open("/proc/thread-self/net/netlink")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []NetlinkSocket
	sc := bufio.NewScanner(f)
	sc.Scan() // the header: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 {
			return nil, fmt.Errorf("netlab: /proc/net/netlink: %q", sc.Text())
		}
		proto, err := strconv.Atoi(fs[1])
		if err != nil {
			return nil, fmt.Errorf("netlab: /proc/net/netlink: %q: %w", sc.Text(), err)
		}
		ino, err := strconv.ParseUint(fs[9], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("netlab: /proc/net/netlink: %q: %w", sc.Text(), err)
		}
		out = append(out, NetlinkSocket{Protocol: proto, Inode: ino})
	}
	return out, sc.Err()
}

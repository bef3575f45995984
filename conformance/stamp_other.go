//go:build !linux

package conformance

import (
	"net"
	"time"
)

// stampArrivals: kernel arrival stamps are read on Linux only.
func stampArrivals(net.PacketConn) bool { return false }

func arrivalStamp([]byte) (time.Time, bool) { return time.Time{}, false }

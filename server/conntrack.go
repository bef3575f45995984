package server

import (
	"net"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/store"
)

// flushConntrack ends the connections that came in through mappings a
// client deleted or the server revoked: the guard lets established flows
// pass, so without this a deleted NAT-PMP mapping (PMP-12) or a revoked
// address (LIFE-05) would keep its open connections. Only flows whose
// original destination is the mapping's external endpoint are touched:
// connections the client opened itself are left alone, and so are PEER
// mappings. Expiry does not flush: the kernel ends pinholes on time even
// with pcpd dead, and the same must hold with it alive.
//
// It runs before the replies of the batch are sent: a flush in the
// background raced the client, and a connection could still carry data
// after its delete was acknowledged (PMP-12, found by the conformance
// suite). A flush walks the conntrack table once per batch, whatever the
// number of mappings ended.
func (s *Server) flushConntrack(ended []store.Lease) {
	var filters []netlink.CustomConntrackFilter
	for _, l := range ended {
		if l.Kind == store.KindPeer || !l.ExternalAddr.IsValid() || l.ExternalPort == 0 {
			continue
		}
		f := &netlink.ConntrackFilter{}
		if f.AddProtocol(l.Protocol) != nil ||
			f.AddIP(netlink.ConntrackOrigDstIP, net.IP(l.ExternalAddr.AsSlice())) != nil ||
			f.AddPort(netlink.ConntrackOrigDstPort, l.ExternalPort) != nil {
			continue
		}
		filters = append(filters, f)
	}
	if len(filters) == 0 || s.cfg.KeepConnections {
		return
	}
	func() {
		var h *netlink.Handle
		var err error
		if nsSet(s.cfg.NetNS) {
			h, err = netlink.NewHandleAt(s.cfg.NetNS)
		} else {
			h, err = netlink.NewHandle()
		}
		if err != nil {
			s.log.Debug("conntrack flush", zap.Error(err))
			return
		}
		defer h.Close()
		var n uint
		for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			k, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, fam, filters...)
			if err != nil {
				s.log.Debug("conntrack flush", zap.Error(err))
			}
			n += k
		}
		if n > 0 {
			s.log.Info("ended connections of removed mappings", zap.Uint("flows", n))
		}
	}()
}

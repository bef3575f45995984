package server

import (
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// The ctnetlink constants moved to internal/ctnl; the tests that build
// their own messages use them under their former names.
const (
	nfnlSubsysCtnetlink = unix.NFNL_SUBSYS_CTNETLINK
	ctMsgGet            = ctnl.MsgGet
	ctMsgDelete         = ctnl.MsgDelete

	ctaTupleOrig  = ctnl.TupleOrig
	ctaTupleIP    = ctnl.TupleIP
	ctaTupleProto = ctnl.TupleProto
	ctaIPv4Src    = ctnl.IPv4Src
	ctaIPv4Dst    = ctnl.IPv4Dst
	ctaProtoNum   = ctnl.ProtoNum
	ctaProtoSrc   = ctnl.ProtoSrcPort
	ctaProtoDst   = ctnl.ProtoDstPort
)

func nfgen(family uint8) []byte { return []byte{family, 0, 0, 0} }

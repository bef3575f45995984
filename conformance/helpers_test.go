package conformance

import (
	"flag"
	"net/netip"
)

func netipAddrPort(a netip.Addr, p uint16) netip.AddrPort { return netip.AddrPortFrom(a, p) }

// fromEnviron builds an Env from the PCP_* variables alone.
func fromEnviron() (*Env, error) {
	fs := flag.NewFlagSet("conformance", flag.ContinueOnError)
	tg := Flags(fs)
	if err := fs.Parse(nil); err != nil {
		return nil, err
	}
	return tg.Finish()
}

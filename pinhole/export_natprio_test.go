package pinhole

import "github.com/google/nftables"

// SetDNATPriority makes the Backends made from now on hook their DNAT
// chain at p (an older pcpd's layout: dstnat), until restore is called.
func SetDNATPriority(p nftables.ChainPriority) (restore func()) {
	old := dnatPriority
	dnatPriority = p
	return func() { dnatPriority = old }
}

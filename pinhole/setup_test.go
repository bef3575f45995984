package pinhole_test

import (
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

func TestSetupListing(t *testing.T) {
	ns := netlab.NewNS(t, "ph")
	b := newBackend(t, ns, pinhole.Config{})
	_ = b
	for _, c := range []string{"forward", "guard6", "guard4", "prerouting"} {
		out, err := ns.Run("nft", "list", "chain", "inet", "pcpd", c)
		t.Log(c, out, err)
	}
	out, err := ns.Run("nft", "list", "sets")
	t.Log(out, err)
}

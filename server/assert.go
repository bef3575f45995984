package server

import (
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// The real collaborators satisfy the engine's interfaces.
var (
	_ Firewall     = (*pinhole.Backend)(nil)
	_ OwnerMeter   = (*pinhole.Backend)(nil)
	_ RouteLookups = (*pinhole.Backend)(nil)
	_ ServedSetter = (*pinhole.Backend)(nil)
	_ LeaseStore   = (*store.Store)(nil)
	_ Policy       = (*policy.Policy)(nil)
)

package store

import (
	"net/netip"
	"strconv"
	"time"
)

// Key is a lease's identity: who holds it and what inside the tunnel it opens
// (DESIGN.md "Leases keyed by (client, protocol, internal address, internal
// port)"). Remote is zero for MAP and NAT-PMP leases; a PEER lease also names
// its remote peer, because one internal tuple may hold several PEER mappings
// (PEER-04 keys on the remote too) next to one MAP (MAP-08).
//
// Fields are ordered for size, not meaning (a million leases are held in
// memory): 80 octets instead of 88.
type Key struct {
	Owner        string // client name: WireGuard peer (public key, base64) or static client name; ≤ 255 octets
	InternalAddr netip.Addr
	Remote       netip.AddrPort // PEER remote peer; zero for MAP / NAT-PMP
	InternalPort uint16         // 0 = all ports
	Protocol     uint8          // IANA protocol number; 0 = all
}

// Kind says which protocol created a lease; MAP-20 and PMP-05 treat them
// differently.
type Kind uint8

const (
	KindMap    Kind = 1 // PCP MAP (RFC 6887 §11)
	KindPeer   Kind = 2 // PCP PEER (RFC 6887 §12)
	KindNATPMP Kind = 3 // NAT-PMP mapping (RFC 6886 §3.3)
)

func (k Kind) String() string {
	switch k {
	case KindMap:
		return "map"
	case KindPeer:
		return "peer"
	case KindNATPMP:
		return "natpmp"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Filter is one FILTER option kept on a MAP lease (RFC 6887 §13.3, FLT-01):
// inbound traffic is admitted only from Prefix, and only from Port unless it
// is 0.
type Filter struct {
	Prefix netip.Prefix
	Port   uint16
}

// Lease is everything pcpd must remember about one mapping across a restart.
type Lease struct {
	Key
	ExternalAddr  netip.Addr
	Filters       []Filter       // FLT-01..04; at most MaxFilters
	ClientAddr    netip.AddrPort // where the last reply went: unsolicited ANNOUNCE / mapping updates (ANN-06, UPD-02)
	ServerAddr    netip.AddrPort // the serving address the request came in on (HDR-02: send from there)
	Created       time.Time
	Expires       time.Time
	Description   string // DESCRIPTION option (OPT-09); ≤ MaxDescription octets
	Nonce         [12]byte
	ExternalPort  uint16
	Kind          Kind
	ThirdParty    bool // created through THIRD_PARTY (TP-04): echo the option in updates
	PreferFailure bool // created with PREFER_FAILURE (UPD-02: losing its external → CANNOT_PROVIDE_EXTERNAL)
}

// Limits the encoder enforces; a lease beyond them is refused with
// ErrInvalidLease before anything is written.
const (
	MaxOwner       = 255
	MaxDescription = 1016 // RFC 7220 option data can not carry more (OPT-09)
	MaxFilters     = 255
)

// State is what Open found on disk.
type State struct {
	// Leases as stored, expired ones included: the engine drops those (it
	// also has to remove them from the kernel, so it must see them).
	Leases []Lease
	// Stream, when not nil (WithLeasesLater), hands out the stored
	// leases instead of Leases (then nil), expired ones included, each
	// decoded into the same scratch lease: *Lease is valid only during
	// the call to fn, which copies what must outlive it. It reads the
	// state file again (the log applied on top; a state restored from the
	// backup copy without it), as Open checked it; it
	// must be called before the first Commit (it then fails, as it does
	// when a commit is made during the read, and with ErrUnavailable
	// once a write opened the state file again by name and found another
	// file there, or when it read another number of leases than Open
	// checked), and may be called more than once. An error of fn ends it with that error; a panic of fn goes on
	// up as it is (only bbolt's is taken for damage: ErrCorrupt).
	Stream func(fn func(*Lease) error) error
	// Quarantines are the MAP-22 quarantines of freed IPv4 external ports
	// (quarantine.go), ended ones included: the engine drops those
	// (CommitQuar), as it drops expired leases. Collected even WithStream:
	// there are at most two per external port.
	Quarantines []Quarantine
	// EpochOrigin is the wall time at which the PCP epoch was 0 (EPO-04).
	// Zero when Fresh.
	EpochOrigin time.Time
	// Fresh means the mapping state was lost, may have been lost, or is new:
	// the engine must reset the epoch (ResetEpoch) and announce (ANN-03,
	// EPO-03). Fresh stays true on every Open until ResetEpoch succeeds.
	Fresh bool
	// Recovered is non-empty when Open had to repair something: what was
	// wrong and what it did (e.g. restored from the backup copy, or
	// dropped damaged quarantines, which alone leaves Fresh false).
	Recovered string
}

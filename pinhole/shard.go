package pinhole

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
)

// portShards is how many sets hold the port pinholes (kindPort): pin6,
// pin6_1, ..., pin6_7. A pinhole's set is chosen by a hash of its key
// (portShard), so delete, renewal, List, the audit and the watch need no
// state of their own to find it. The kernel's resizable hash (nft_rhash)
// doubles a set's table at 75 % in one work item that holds a CPU: at
// 98 304 elements 31-53 ms in one set, 2.7-4.7 ms in each of 8, spread
// over the ~180 ms in which the shards cross their thresholds
// (BENCHMARKS.md item 76). The cost: guard6 and recheck6 look a packet of
// a new flow up in each shard in turn (0.17-0.2 µs a lookup that misses).
const portShards = 8

// base is k's shape: kindPort for every shard of pin6.
func base(k kind) kind {
	if k >= kindPort1 {
		return kindPort
	}
	return k
}

// portShard is the set of the port pinhole whose element key (addr .
// proto . port, as appendElement writes it) is key: FNV-1a of the key.
func portShard(key []byte) kind {
	h := uint32(2166136261)
	for _, c := range key {
		h = (h ^ uint32(c)) * 16777619
	}
	if i := h % portShards; i > 0 {
		return kindPort1 + kind(i) - 1
	}
	return kindPort
}

func init() {
	for k := kindPort1; k < numKinds; k++ {
		s := specs[kindPort]
		s.name = fmt.Sprintf("pin6_%d", k-kindPort1+1)
		s.comment = fmt.Sprintf("pcpd: IPv6 pinholes, shard %d", k-kindPort1+1)
		specs[k] = s
	}
}

// shardMoveChunk is how many elements one transaction of
// movePortShards moves.
const shardMoveChunk = 256

// checkUnsharded notes (b.unsharded) whether the table holds pin6 at a
// Backend's first Setup: pin6 may then hold port pinholes of the other
// shards, either a table an earlier pcpd laid out (all of them in pin6,
// no pin6_1 .. pin6_7) or a move (movePortShards) cut short by a crash
// or a failed transaction, after the shards were made. Before, only the
// first was looked for (pin6 without pin6_1): the elements a cut-short
// move left in pin6 were read as odd at the next start (in the wrong
// set) and the audit deleted them, closing live pinholes until their
// clients renewed (TestPortShardsUpgrade/cut_short). The cost: one read
// of pin6 (1/portShards of the port pinholes) at a start. Under mu.
func (b *Backend) checkUnsharded() error {
	if b.shardsRead {
		return nil
	}
	have, err := b.presentSets()
	if err != nil {
		return err
	}
	b.unsharded = have[b.sets[kindPort].Name]
	b.shardsRead = true
	return nil
}

// movePortShards moves the port pinholes an earlier pcpd (or a move cut
// short) left in pin6 to the shards portShard picks for them, once the layout looks every
// shard up: each transaction adds a chunk of elements to their shards
// (with the time they had left) and deletes them from pin6, so a
// pinhole passes its traffic before, during and after. Elements that
// are not pcpd's (decode: odd in their shard) stay where they are, for
// the audit. Under mu; b.unsharded is cleared once all are moved (a
// failure leaves it set: the next Setup moves what is left).
func (b *Backend) movePortShards() error {
	elems, err := b.readConn().GetSetElements(b.sets[kindPort])
	if err != nil {
		return fmt.Errorf("pinhole: read %s: %w", b.sets[kindPort].Name, classify(err))
	}
	flush := func() error {
		if err := b.flush(); err != nil {
			return fmt.Errorf("pinhole: move %s's elements to its shards: %w", b.sets[kindPort].Name, classify(err))
		}
		return nil
	}
	var queued int
	for _, e := range elems {
		k := portShard(e.Key)
		if k == kindPort || isSentinel(kindPort, e) {
			continue
		}
		if p, err := decode(k, e); err != nil || p.Odd() {
			continue
		}
		add := nftables.SetElement{Key: e.Key}
		if e.Timeout != 0 {
			add.Timeout = max(ceilMillis(e.Expires), time.Millisecond)
		}
		if err := b.conn.SetAddElements(b.sets[k], []nftables.SetElement{add}); err != nil {
			return err
		}
		if err := b.conn.SetDeleteElements(b.sets[kindPort], []nftables.SetElement{{Key: e.Key}}); err != nil {
			return err
		}
		if queued++; queued == shardMoveChunk {
			queued = 0
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if queued > 0 {
		if err := flush(); err != nil {
			return err
		}
	}
	b.unsharded = false
	return nil
}

// PortSetName is the name of the set (standalone; attached, with the
// table's prefix before it) that holds the port pinhole addr . proto .
// port (a Pinhole of no filter, external port = internal port): pin6 or
// one of pin6_1 .. pin6_7. For operators' tools and the tests that add,
// delete or flush a port pinhole's element by hand.
func PortSetName(addr netip.Addr, proto uint8, port uint16) string {
	return specs[kindOf(Pinhole{Protocol: proto, InternalAddr: addr, InternalPort: port, ExternalAddr: addr, ExternalPort: port})].name
}

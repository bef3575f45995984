package store

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"net/netip"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// MAP-22 quarantines. When a mapping's IPv4 external port is freed, the
// engine keeps it for its last holder for the protocol's idle time
// (server/quarantine.go). That promise must outlive a restart and a kill
// -9, so a quarantine is a record of its own kind, written in the same
// log record (the same group commit, the same fdatasync) as the lease
// change that freed the port: once the delete's SUCCESS is sent, both are
// durable, or neither was.
//
// Why a record kind of its own, not the freed lease kept as a tombstone
// under its lease key: a quarantine is keyed by the external port, a lease
// by its internal tuple. A client that moves a mapping to a new port (new
// nonce, PROTOCOL.md choice (c)) puts a lease under the same key while the
// old port is quarantined, and one client may free several ports of one
// tuple in turn; a tombstone under the lease key would be overwritten and
// its quarantine lost. A tombstone lease would also reach every consumer of
// State.Leases (restore, reconcile, policy checks) as a lease to skip, and
// an older pcpd would take it for a corrupt lease (unknown kind) and move
// the whole state file aside. So quarantines live in a bucket of their own
// ("quarantine", with its own digest "qdigest", so the leases digest and
// everything that reads leases stay as they were) and travel through the
// log as two more entry ops (entryQDel, entryQPut); the log, group commit,
// checkpoints and backup copy carry them with no change.
//
// Format compatibility (the store format version stays 1: readTx refuses
// any other, and an older pcpd would then move the file aside as corrupt):
//   - a state file written before quarantines has neither the bucket nor
//     qdigest: it opens with no quarantines; the first fold that carries
//     one creates both.
//   - an older pcpd opening a newer state directory after a clean shutdown
//     (Close folds the log) reads its leases and ignores the quarantine
//     bucket: the quarantines are forgotten, as that version always
//     forgot them, and a later upgrade finds the old records again (the
//     engine drops the expired ones and those on ports leased meanwhile).
//     After a kill -9, the log may hold quarantine entries, which the older
//     pcpd's log reader does not know: it treats the segment as damaged
//     from that record on (leases logged after it are lost, epoch reset).
//     Stop pcpd cleanly before downgrading.
//
// Records (codec.go's addr and time encodings):
//
//	key:   protocol(1) addr(external) port(2)
//	value: version(1)=1 ownerLen(1) owner addr(internal) port(2)
//	       nonce(12) until(8) crc32c(4) over key || value-without-crc
const (
	entryQDel = 3 // log entry: end the quarantine at key
	entryQPut = 4 // log entry: quarantine at key, value a quarantine record

	quarVersion = 1
)

var (
	bucketQuar  = []byte("quarantine")
	metaQDigest = []byte("qdigest") // quarantine count(8) and sum of record checksums(8)
)

// Endpoint is the external port a quarantine holds.
type Endpoint struct {
	Addr     netip.Addr // the IPv4 external address
	Port     uint16
	Protocol uint8
}

// Quarantine is a freed IPv4 external port kept for its last holder until
// Until (MAP-22): only Owner's InternalAddr:InternalPort with Nonce may
// take it again before then.
type Quarantine struct {
	Endpoint
	Owner        string // ≤ MaxOwner octets
	InternalAddr netip.Addr
	Nonce        [12]byte
	Until        time.Time
	InternalPort uint16
}

func validateEndpoint(e *Endpoint) error {
	if !e.Addr.IsValid() || e.Addr.Zone() != "" {
		return fmt.Errorf("store: quarantine endpoint without a plain address: %w", ErrInvalidLease)
	}
	return nil
}

func (q *Quarantine) validate() error {
	switch {
	case len(q.Owner) > MaxOwner:
		return fmt.Errorf("store: owner is %d octets, limit %d: %w", len(q.Owner), MaxOwner, ErrInvalidLease)
	case !q.InternalAddr.IsValid() || len(q.InternalAddr.Zone()) > 255:
		return fmt.Errorf("store: quarantine without a usable internal address: %w", ErrInvalidLease)
	case q.Until.IsZero() || q.Until.Before(minTime) || q.Until.After(maxTime):
		return fmt.Errorf("store: quarantine until %v out of range: %w", q.Until, ErrInvalidLease)
	}
	return validateEndpoint(&q.Endpoint)
}

func appendQuarKey(b []byte, e *Endpoint) []byte {
	b = append(b, e.Protocol)
	b = appendAddr(b, e.Addr)
	return binary.BigEndian.AppendUint16(b, e.Port)
}

// appendQuarValue appends q's value record; key must be appendQuarKey(q),
// it goes into the checksum. q must have passed validate.
func appendQuarValue(b, key []byte, q *Quarantine) []byte {
	start := len(b)
	b = append(b, quarVersion, byte(len(q.Owner)))
	b = append(b, q.Owner...)
	b = appendAddr(b, q.InternalAddr)
	b = binary.BigEndian.AppendUint16(b, q.InternalPort)
	b = append(b, q.Nonce[:]...)
	b = appendTime(b, q.Until)
	crc := crc32.Update(crc32.Checksum(key, crcTable), crcTable, b[start:])
	return binary.BigEndian.AppendUint32(b, crc)
}

func appendQuarDelEntry(b []byte, e *Endpoint) []byte {
	return appendKeyEntry(b, entryQDel, e, appendQuarKey)
}

func appendQuarPutEntry(b []byte, q *Quarantine) []byte {
	return appendKeyValueEntry(b, entryQPut, &q.Endpoint, q, appendQuarKey, appendQuarValue)
}

// decodeQuarantine parses one stored quarantine record. It never panics and
// returns a zero Quarantine with any error.
func decodeQuarantine(key, val []byte, in interner) (Quarantine, error) {
	if len(val) < 4 {
		return Quarantine{}, fmt.Errorf("store: quarantine record of %d octets: %w", len(val), ErrCorrupt)
	}
	body, sum := val[:len(val)-4], binary.BigEndian.Uint32(val[len(val)-4:])
	if got := crc32.Update(crc32.Checksum(key, crcTable), crcTable, body); got != sum {
		return Quarantine{}, fmt.Errorf("store: quarantine record checksum %08x, want %08x: %w", got, sum, ErrCorrupt)
	}
	var q Quarantine
	r := reader{b: key}
	q.Protocol = r.u8()
	q.Addr = r.addr()
	q.Port = r.u16()
	if r.err == nil && len(r.b) != 0 {
		r.fail("%d trailing octets in quarantine key", len(r.b))
	}
	kerr := r.err
	r = reader{b: body, err: kerr}
	if v := r.u8(); r.err == nil && v != quarVersion {
		r.fail("quarantine record version %d, want %d", v, quarVersion)
	}
	if owner := r.next(int(r.u8())); owner != nil {
		q.Owner = in.get(owner)
	}
	q.InternalAddr = r.addr()
	q.InternalPort = r.u16()
	copy(q.Nonce[:], r.next(12))
	q.Until = r.time()
	if r.err == nil && len(r.b) != 0 {
		r.fail("%d trailing octets in quarantine record", len(r.b))
	}
	if r.err == nil {
		if err := q.validate(); err != nil {
			r.fail("decoded quarantine invalid (%v)", err)
		}
	}
	if r.err != nil {
		return Quarantine{}, r.err
	}
	return q, nil
}

// readQuarantines decodes the quarantine bucket (absent in a file written
// before quarantines: none), checks it against qdigest, and applies the
// log's quarantine entries (ov may be nil) on top.
//
// Damage confined to quarantines (a record failing its checksum or its
// checks, a record or the bucket lost, qdigest lost or wrong, a logged
// quarantine entry that does not decode) costs quarantines only: it never
// fails the read, so the leases and the epoch stay as they are. damage
// (empty when all is well) names what was dropped; Open reports it in
// State.Recovered and the next fold rebuilds the bucket and its digest
// (repairQuarantines). A quarantine is no lease: losing one ends no
// client's mapping, only MAP-22's hold on a freed port (≤ its idle time,
// at most ≈ 124 min), so it is no reason to move the state file aside,
// revert the leases to the backup copy and reset the epoch (every client
// re-mapping), which is what it cost before.
//
// The records that pass their own checks are kept, not dropped with the
// rest: each carries a CRC-32C over its key and value, so one that passes
// it and decodes into a valid quarantine is one pcpd wrote, and the
// digest that failed says only that some record is missing or damaged,
// not which of the intact ones to doubt. Keeping an intact record that
// should not be there (a stale one) holds a port at most until its Until,
// and the engine caps that at the idle time from now and drops those on
// ports leased meanwhile; dropping a live one hands a port to the next
// asker while its last holder's traffic may still arrive, which is what
// MAP-22 is there to prevent.
func readQuarantines(tx *bolt.Tx, ov *overlay, in interner) (out []Quarantine, damage string) {
	meta, b := tx.Bucket(bucketMeta), tx.Bucket(bucketQuar)
	dv := meta.Get(metaQDigest)
	var problems, dropped []string
	want, wantOK := parseDigest(dv)
	switch {
	case b == nil && dv == nil:
		wantOK = true // written before quarantines, or none yet: zero
	case b == nil && wantOK:
		problems = append(problems, fmt.Sprintf("bucket missing, its digest says %d records", want.count))
		wantOK = false
	case b == nil:
		problems = append(problems, "bucket missing, its digest damaged")
	case dv == nil:
		problems = append(problems, "digest missing")
	case !wantOK:
		problems = append(problems, fmt.Sprintf("digest of %d octets, want 16", len(dv)))
	}
	// A key of the right name but the wrong kind (a flipped flag bit of an
	// inline bucket's element, or a crafted file) is damage too, and one
	// repairQuarantines must clear: Put and CreateBucket fail on it.
	if b == nil && rootValue(tx, bucketQuar) {
		problems = append(problems, "a plain value where the bucket belongs")
	}
	if dv == nil && meta.Bucket(metaQDigest) != nil {
		problems = append(problems, "the digest is a bucket")
		wantOK = false
	}
	var got digest
	if b != nil {
		c := b.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if v == nil {
				dropped = append(dropped, quarKeyName(k)+": a nested bucket, not a record")
				continue
			}
			got.add(v, +1)
			if ov != nil {
				if val, ok := ov.quar[string(k)]; ok {
					ov.quarUsed[string(k)] = true
					if val == nil {
						continue
					}
					v = val
				}
			}
			q, err := decodeQuarantine(k, v, in)
			if err != nil {
				dropped = append(dropped, quarKeyName(k)+": "+err.Error())
				continue
			}
			out = append(out, q)
		}
	}
	if wantOK && got != want {
		p := fmt.Sprintf("found %d records (checksum sum %x), the digest says %d (%x)",
			got.count, got.sum, want.count, want.sum)
		if want.count > got.count {
			p += fmt.Sprintf(": %d lost, their ports unknown", want.count-got.count)
		}
		problems = append(problems, p)
	}
	if ov != nil {
		for _, k := range ov.quarOrder {
			val := ov.quar[k]
			if ov.quarUsed[k] || val == nil {
				continue
			}
			q, err := decodeQuarantine([]byte(k), val, in)
			if err != nil {
				// The log record's CRC held, so this is no damage at
				// rest but an entry this version can not read: like a
				// record of the file, it costs this quarantine only.
				dropped = append(dropped, "logged "+quarKeyName([]byte(k))+": "+err.Error())
				continue
			}
			out = append(out, q)
		}
	}
	if len(problems) == 0 && len(dropped) == 0 {
		return out, ""
	}
	if len(dropped) > 0 {
		const show = 5
		p := fmt.Sprintf("dropped %d record(s) (", len(dropped))
		if len(dropped) > show {
			p += strings.Join(dropped[:show], "; ") + fmt.Sprintf("; %d more)", len(dropped)-show)
		} else {
			p += strings.Join(dropped, "; ") + ")"
		}
		problems = append(problems, p)
	}
	return out, fmt.Sprintf("MAP-22 quarantines damaged (%s): kept the %d that check out, the lost ones' ports are no longer held for their last holders; leases and epoch unaffected; the quarantine bucket is rebuilt from what was kept when the state file is next written",
		strings.Join(problems, "; "), len(out))
}

// rootValue: the root holds key as a plain value, not a bucket.
func rootValue(tx *bolt.Tx, key []byte) bool {
	k, v := tx.Cursor().Seek(key)
	return v != nil && bytes.Equal(k, key)
}

// quarKeyName names the endpoint of a quarantine key for a report, or
// shows the key's octets when it does not parse.
func quarKeyName(k []byte) string {
	r := reader{b: k}
	proto := r.u8()
	a := r.addr()
	port := r.u16()
	if r.err != nil || len(r.b) != 0 || !a.IsValid() {
		return fmt.Sprintf("key %x", k)
	}
	name := fmt.Sprintf("protocol %d", proto)
	switch proto {
	case 6:
		name = "tcp"
	case 17:
		name = "udp"
	}
	return fmt.Sprintf("%s %s", name, netip.AddrPortFrom(a, port))
}

// repairQuarantines rebuilds the quarantine bucket and qdigest after
// readQuarantines found them damaged: it applies the log's quarantine
// changes ch (as foldQuarantines, without trusting the stored digest),
// drops every record that does not decode, and writes the digest of what
// is left. In the same transaction as the fold, so a failure leaves the
// file as it was and the next fold tries again.
func repairQuarantines(tx *bolt.Tx, meta *bolt.Bucket, ch []kvChange) error {
	if tx.Bucket(bucketQuar) == nil && rootValue(tx, bucketQuar) {
		c := tx.Cursor()
		c.Seek(bucketQuar)
		if err := c.Delete(); err != nil {
			return err
		}
	}
	if meta.Bucket(metaQDigest) != nil {
		if err := meta.DeleteBucket(metaQDigest); err != nil {
			return err
		}
	}
	b, err := tx.CreateBucketIfNotExists(bucketQuar)
	if err != nil {
		return err
	}
	for _, c := range ch {
		if c.val == nil {
			if b.Bucket(c.key) != nil {
				err = b.DeleteBucket(c.key)
			} else {
				err = b.Delete(c.key)
			}
		} else {
			if b.Bucket(c.key) != nil {
				if err := b.DeleteBucket(c.key); err != nil {
					return err
				}
			}
			err = b.Put(c.key, c.val)
		}
		if err != nil {
			return err
		}
	}
	var bad, nested [][]byte
	var d digest
	c := b.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		switch {
		case v == nil:
			nested = append(nested, bytes.Clone(k))
		default:
			if _, err := decodeQuarantine(k, v, nil); err != nil {
				bad = append(bad, bytes.Clone(k))
				continue
			}
			d.add(v, +1)
		}
	}
	for _, k := range nested {
		if err := b.DeleteBucket(k); err != nil {
			return err
		}
	}
	for _, k := range bad {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return meta.Put(metaQDigest, d.bytes())
}

// foldQuarantines applies the log's quarantine changes (in log order) to
// the quarantine bucket and its digest, creating both on first use.
func foldQuarantines(tx *bolt.Tx, meta *bolt.Bucket, ch []kvChange) error {
	if len(ch) == 0 {
		return nil
	}
	b, err := tx.CreateBucketIfNotExists(bucketQuar)
	if err != nil {
		return err
	}
	var d digest
	if v := meta.Get(metaQDigest); v != nil {
		var ok bool
		if d, ok = parseDigest(v); !ok {
			return fmt.Errorf("store: quarantine digest damaged: %w", ErrCorrupt)
		}
	}
	for _, c := range ch {
		if old := b.Get(c.key); old != nil {
			d.add(old, -1)
			if c.val == nil {
				if err := b.Delete(c.key); err != nil {
					return err
				}
			}
		}
		if c.val != nil {
			if err := b.Put(c.key, c.val); err != nil {
				return err
			}
			d.add(c.val, +1)
		}
	}
	return meta.Put(metaQDigest, d.bytes())
}

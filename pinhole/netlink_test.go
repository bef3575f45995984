package pinhole

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nlenc"
	"golang.org/x/sys/unix"
)

// These tests need no root: they look at the netlink messages Apply sends,
// through a fake socket (nltest) that answers each message with an ack.

// sentElem is one element of a NEWSETELEM/DELSETELEM message, decoded.
type sentElem struct {
	Key, KeyEnd, Data []byte
	TimeoutMs         uint64
}

// sentMsg is one message of a batch, decoded far enough to check it.
type sentMsg struct {
	Op    string // "newsetelem", "delsetelem", "begin", "end", or the type
	Set   string
	Elems []sentElem
}

func decodeMsg(t testing.TB, m netlink.Message) sentMsg {
	t.Helper()
	switch m.Header.Type {
	case netlink.HeaderType(unix.NFNL_MSG_BATCH_BEGIN):
		return sentMsg{Op: "begin"}
	case netlink.HeaderType(unix.NFNL_MSG_BATCH_END):
		return sentMsg{Op: "end"}
	}
	var s sentMsg
	switch m.Header.Type & 0xff {
	case unix.NFT_MSG_NEWSETELEM:
		s.Op = "newsetelem"
	case unix.NFT_MSG_DELSETELEM:
		s.Op = "delsetelem"
	default:
		return sentMsg{Op: fmt.Sprintf("type %d", m.Header.Type&0xff)}
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:]) // after nfgenmsg
	if err != nil {
		t.Fatal(err)
	}
	value := func(b []byte) []byte {
		d, err := netlink.NewAttributeDecoder(b)
		if err != nil {
			t.Fatal(err)
		}
		var v []byte
		for d.Next() {
			v = d.Bytes()
		}
		return v
	}
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_SET_ELEM_LIST_SET:
			s.Set = ad.String()
		case unix.NFTA_SET_ELEM_LIST_ELEMENTS:
			ad.Nested(func(list *netlink.AttributeDecoder) error {
				for list.Next() {
					var e sentElem
					list.Nested(func(el *netlink.AttributeDecoder) error {
						for el.Next() {
							switch el.Type() {
							case unix.NFTA_SET_ELEM_KEY:
								e.Key = value(el.Bytes())
							case nftables.NFTA_SET_ELEM_KEY_END:
								e.KeyEnd = value(el.Bytes())
							case unix.NFTA_SET_ELEM_DATA:
								e.Data = value(el.Bytes())
							case unix.NFTA_SET_ELEM_TIMEOUT:
								e.TimeoutMs = binary.BigEndian.Uint64(el.Bytes())
							}
						}
						return nil
					})
					s.Elems = append(s.Elems, e)
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	return s
}

// fakeKernel acks every message, and fails with EEXIST any message that
// carries a poisoned key, and with EINVAL one whose key has the wrong length
// for a 16-byte set (the blame probe's sentinel). It records each batch.
type fakeKernel struct {
	t       testing.TB
	poison  []byte
	batches [][]sentMsg
	acks    []netlink.Message
}

func (f *fakeKernel) dial(req []netlink.Message) ([]netlink.Message, error) {
	if req == nil { // the socket asks for the next queued reply
		if len(f.acks) == 0 {
			return nil, io.EOF
		}
		a := f.acks[0]
		f.acks = f.acks[1:]
		return []netlink.Message{a}, nil
	}
	var batch []sentMsg
	for _, m := range req {
		s := decodeMsg(f.t, m)
		batch = append(batch, s)
		if s.Op == "begin" || s.Op == "end" {
			continue
		}
		errno := 0
		for _, e := range s.Elems {
			if f.poison != nil && bytes.Equal(e.Key, f.poison) {
				errno = int(unix.EEXIST)
			}
			if len(e.Key) == 1 {
				errno = int(unix.EINVAL)
			}
		}
		hdr, _ := m.MarshalBinary()
		ack := netlink.Message{
			Header: netlink.Header{Type: netlink.Error, Sequence: m.Header.Sequence, PID: m.Header.PID},
			Data:   append(nlenc.Int32Bytes(int32(-errno)), hdr[:16]...),
		}
		f.acks = append(f.acks, ack)
	}
	f.batches = append(f.batches, batch)
	return nil, nil
}

func fakeBackend(t *testing.T, f *fakeKernel) *Backend {
	t.Helper()
	f.t = t
	conn, err := nftables.New(nftables.WithTestDial(f.dial))
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(conn, Config{})
	if err != nil {
		t.Fatal(err)
	}
	// Setup's probe never ran (the fake kernel holds nothing to read
	// back): take the in-place path, as on Linux ≥ 6.10. Tests of the
	// other path turn it off.
	b.inPlace = true
	return b
}

var (
	tAddr = netip.MustParseAddr("2001:db8:1:2::10")
	tPub  = netip.MustParseAddr("198.51.100.1")
	tCli4 = netip.MustParseAddr("10.100.0.2")
)

// TestApplyOneTransaction: a mixed batch is one netlink transaction, with
// Install and Refresh as two adds in place (the first with the timeout
// nudged, see refreshNudge; one too short to nudge as add/delete/add) and
// Delete as add/delete, grouped per set, and element keys laid out as the
// kernel's registers hold them.
func TestApplyOneTransaction(t *testing.T) {
	f := &fakeKernel{}
	b := fakeBackend(t, f)
	web := Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 443}
	gone := Pinhole{Protocol: 17, InternalAddr: tAddr, InternalPort: 53}
	napt := Pinhole{Protocol: 6, InternalAddr: tCli4, InternalPort: 80, ExternalAddr: tPub, ExternalPort: 8080}
	err := b.Apply([]Op{
		{Kind: Install, Pinhole: web, Timeout: 90 * time.Second},
		{Kind: Delete, Pinhole: gone},
		{Kind: Refresh, Pinhole: napt, Timeout: 1500 * time.Microsecond}, // rounds up to 2 ms
	})
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	webKey := []byte{
		0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0x00, 0x10, // ip6 daddr
		6, 0, 0, 0, // meta l4proto, padded to a register
		0x01, 0xbb, 0, 0, // th dport 443, network order, padded
	}
	goneKey := append(append([]byte{}, webKey[:16]...), 17, 0, 0, 0, 0, 53, 0, 0)
	naptKey := []byte{198, 51, 100, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0}
	naptData := []byte{10, 100, 0, 2, 0, 80, 0, 0} // ip daddr . th dport after DNAT
	// The NAPT element's SNAT companion (two-way mapping, RFC 6886 §3.9)
	// travels with it through every step.
	snatKey := []byte{10, 100, 0, 2, 6, 0, 0, 0, 0, 80, 0, 0} // ip saddr . meta l4proto . th sport
	snatData := []byte{198, 51, 100, 1, 0x1f, 0x90, 0, 0}     // ip saddr . th sport after SNAT
	want := [][]sentMsg{{
		{Op: "begin"},
		{Op: "newsetelem", Set: "pin6", Elems: []sentElem{{Key: webKey, TimeoutMs: 89950}, {Key: goneKey, TimeoutMs: 1000}}},
		{Op: "newsetelem", Set: "napt4", Elems: []sentElem{{Key: naptKey, Data: naptData, TimeoutMs: 2}}},
		{Op: "newsetelem", Set: "snat4", Elems: []sentElem{{Key: snatKey, Data: snatData, TimeoutMs: 2}}},
		{Op: "delsetelem", Set: "pin6", Elems: []sentElem{{Key: goneKey}}},
		{Op: "delsetelem", Set: "napt4", Elems: []sentElem{{Key: naptKey, Data: naptData}}},
		{Op: "delsetelem", Set: "snat4", Elems: []sentElem{{Key: snatKey, Data: snatData}}},
		{Op: "newsetelem", Set: "pin6", Elems: []sentElem{{Key: webKey, TimeoutMs: 90000}}},
		{Op: "newsetelem", Set: "napt4", Elems: []sentElem{{Key: naptKey, Data: naptData, TimeoutMs: 2}}},
		{Op: "newsetelem", Set: "snat4", Elems: []sentElem{{Key: snatKey, Data: snatData, TimeoutMs: 2}}},
		{Op: "end"},
	}}
	if diff := cmp.Diff(want, f.batches); diff != "" {
		t.Errorf("batches (-want +got):\n%s", diff)
	}
}

// TestApplyRecreateWithoutInPlace: on a kernel that does not update an
// element's timeout when it is re-added (before Linux 6.10), Install and
// Refresh re-create the element (add, delete, add with the exact timeout),
// so a renewal extends and a shortening shortens on any kernel.
func TestApplyRecreateWithoutInPlace(t *testing.T) {
	f := &fakeKernel{}
	b := fakeBackend(t, f)
	b.inPlace = false
	web := Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 443}
	if err := b.Apply([]Op{{Kind: Refresh, Pinhole: web, Timeout: 90 * time.Second}}); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	key := []byte{
		0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0x00, 0x10,
		6, 0, 0, 0,
		0x01, 0xbb, 0, 0,
	}
	want := [][]sentMsg{{
		{Op: "begin"},
		{Op: "newsetelem", Set: "pin6", Elems: []sentElem{{Key: key, TimeoutMs: 90000}}},
		{Op: "delsetelem", Set: "pin6", Elems: []sentElem{{Key: key}}},
		{Op: "newsetelem", Set: "pin6", Elems: []sentElem{{Key: key, TimeoutMs: 90000}}},
		{Op: "end"},
	}}
	if diff := cmp.Diff(want, f.batches); diff != "" {
		t.Errorf("batches (-want +got):\n%s", diff)
	}
}

// TestApplyRepeatedElementPhases: the same element twice in one batch
// starts a new phase, so grouping never reorders two ops on one element.
func TestApplyRepeatedElementPhases(t *testing.T) {
	f := &fakeKernel{}
	b := fakeBackend(t, f)
	p := Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 443}
	if err := b.Apply([]Op{{Kind: Install, Pinhole: p, Timeout: time.Second}, {Kind: Delete, Pinhole: p}}); err != nil {
		t.Fatal(err)
	}
	var ops []string
	for _, m := range f.batches[0] {
		ops = append(ops, m.Op)
	}
	// The Install's two adds share one message (nothing to delete in its
	// phase); the Delete's phase is its guard add and the delete.
	want := []string{"begin", "newsetelem", "newsetelem", "delsetelem", "end"}
	if diff := cmp.Diff(want, ops); diff != "" {
		t.Errorf("messages (-want +got):\n%s", diff)
	}
}

// TestApplyMergedAdds: where a phase deletes nothing from a set, the
// nudged and the exact adds of its elements go as one message (nudged ones
// first, in op order), one message per set; a set with a delete keeps the
// three steps.
func TestApplyMergedAdds(t *testing.T) {
	key := func(port uint16) []byte {
		return []byte{
			0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0x00, 0x10,
			6, 0, 0, 0,
			byte(port >> 8), byte(port), 0, 0,
		}
	}
	naptKey := []byte{198, 51, 100, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0}
	naptData := []byte{10, 100, 0, 2, 0, 80, 0, 0}
	snatKey := []byte{10, 100, 0, 2, 6, 0, 0, 0, 0, 80, 0, 0}
	snatData := []byte{198, 51, 100, 1, 0x1f, 0x90, 0, 0}
	web := func(port uint16) Pinhole { return Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: port} }
	napt := Pinhole{Protocol: 6, InternalAddr: tCli4, InternalPort: 80, ExternalAddr: tPub, ExternalPort: 8080}
	for _, tc := range []struct {
		name string
		ops  []Op
		want []sentMsg
	}{{
		name: "installs and a refresh",
		ops: []Op{
			{Kind: Install, Pinhole: web(443), Timeout: 90 * time.Second},
			{Kind: Refresh, Pinhole: web(80), Timeout: time.Hour},
			{Kind: Install, Pinhole: napt, Timeout: time.Minute},
		},
		want: []sentMsg{
			{Op: "begin"},
			{Op: "newsetelem", Set: "pin6", Elems: []sentElem{
				{Key: key(443), TimeoutMs: 89950}, {Key: key(80), TimeoutMs: 3599950},
				{Key: key(443), TimeoutMs: 90000}, {Key: key(80), TimeoutMs: 3600000}}},
			{Op: "newsetelem", Set: "napt4", Elems: []sentElem{
				{Key: naptKey, Data: naptData, TimeoutMs: 59950}, {Key: naptKey, Data: naptData, TimeoutMs: 60000}}},
			{Op: "newsetelem", Set: "snat4", Elems: []sentElem{
				{Key: snatKey, Data: snatData, TimeoutMs: 59950}, {Key: snatKey, Data: snatData, TimeoutMs: 60000}}},
			{Op: "end"},
		},
	}, {
		name: "a delete in one set only",
		ops: []Op{
			{Kind: Install, Pinhole: web(443), Timeout: 90 * time.Second},
			{Kind: Delete, Pinhole: web(80)},
			{Kind: Install, Pinhole: napt, Timeout: time.Minute},
		},
		want: []sentMsg{
			{Op: "begin"},
			{Op: "newsetelem", Set: "pin6", Elems: []sentElem{{Key: key(443), TimeoutMs: 89950}, {Key: key(80), TimeoutMs: 1000}}},
			{Op: "newsetelem", Set: "napt4", Elems: []sentElem{
				{Key: naptKey, Data: naptData, TimeoutMs: 59950}, {Key: naptKey, Data: naptData, TimeoutMs: 60000}}},
			{Op: "newsetelem", Set: "snat4", Elems: []sentElem{
				{Key: snatKey, Data: snatData, TimeoutMs: 59950}, {Key: snatKey, Data: snatData, TimeoutMs: 60000}}},
			{Op: "delsetelem", Set: "pin6", Elems: []sentElem{{Key: key(80)}}},
			{Op: "newsetelem", Set: "pin6", Elems: []sentElem{{Key: key(443), TimeoutMs: 90000}}},
			{Op: "end"},
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeKernel{}
			b := fakeBackend(t, f)
			if err := b.Apply(tc.ops); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if diff := cmp.Diff([][]sentMsg{tc.want}, f.batches); diff != "" {
				t.Errorf("batches (-want +got):\n%s", diff)
			}
		})
	}
}

// TestApplyBlameProbes: when the kernel refuses one op, blame finds it by
// replaying prefixes, and every replay ends with the failing sentinel, so
// the kernel rolls each one back: no probe can commit a partial batch.
func TestApplyBlameProbes(t *testing.T) {
	for _, tc := range []struct{ n, bad int }{{1, 0}, {2, 1}, {16, 0}, {16, 15}, {256, 77}, {255, 254}} {
		t.Run(fmt.Sprintf("%d ops, op %d fails", tc.n, tc.bad), func(t *testing.T) {
			var ops []Op
			for i := range tc.n {
				ops = append(ops, Op{Kind: Install, Timeout: time.Minute,
					Pinhole: Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: uint16(1000 + i)}})
			}
			e, err := encode(ops[tc.bad])
			if err != nil {
				t.Fatal(err)
			}
			f := &fakeKernel{poison: e.elem.Key}
			b := fakeBackend(t, f)
			err = b.Apply(ops)
			var oe *OpError
			if !errors.As(err, &oe) || oe.Index != tc.bad || !errors.Is(err, ErrConflict) || !errors.Is(err, unix.EEXIST) {
				t.Fatalf("Apply: %v; want *OpError for op %d wrapping ErrConflict and EEXIST", err, tc.bad)
			}
			if oe.Op.Pinhole != ops[tc.bad].Pinhole {
				t.Errorf("OpError.Op = %v, want %v", oe.Op, ops[tc.bad])
			}
			for i, batch := range f.batches[1:] {
				last := batch[len(batch)-2]
				if last.Op != "delsetelem" || len(last.Elems) != 1 || len(last.Elems[0].Key) != 1 {
					t.Errorf("probe %d does not end with the sentinel: %+v", i, last)
				}
			}
			if max := 2 + bitsLen(tc.n); len(f.batches) > max {
				t.Errorf("%d transactions, want at most %d", len(f.batches), max)
			}
		})
	}
}

func bitsLen(n int) int {
	b := 0
	for ; n > 0; n >>= 1 {
		b++
	}
	return b
}

// TestApplyFullPhaseOneSet: a full batch whose elements all fall in the set
// of the largest element (redir6_filter), its adds merged, lists every
// element: each message's element list is one attribute with a 16-bit
// length, so no message may list more than 64 KiB (the root test
// TestApplyFullBatchOneSet shows the kernel then reading only part).
func TestApplyFullPhaseOneSet(t *testing.T) {
	f := &fakeKernel{}
	b := fakeBackend(t, f)
	var ops []Op
	for i := range MaxBatch {
		ops = append(ops, Op{Kind: Install, Timeout: time.Hour, Pinhole: Pinhole{Protocol: 17, InternalAddr: tAddr, InternalPort: 443,
			ExternalAddr: tAddr, ExternalPort: uint16(10000 + i), RemotePrefix: netip.MustParsePrefix("2001:db8:8::/56")}})
	}
	if err := b.Apply(ops); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	count := map[uint64]int{}
	for _, m := range f.batches[0] {
		if m.Op != "newsetelem" {
			continue
		}
		if len(m.Elems) > elemChunk {
			t.Errorf("a message lists %d elements, more than %d", len(m.Elems), elemChunk)
		}
		for _, e := range m.Elems {
			count[e.TimeoutMs]++
		}
	}
	want := map[uint64]int{3599950: MaxBatch, 3600000: MaxBatch}
	if diff := cmp.Diff(want, count); diff != "" {
		t.Errorf("elements by timeout (-want +got):\n%s", diff)
	}
}

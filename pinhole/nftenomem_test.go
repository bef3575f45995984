package pinhole_test

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestApplyAfterCommitFailure (h/nftenomem): a batch whose every message
// passes but whose commit the kernel refuses gets one reply more than it
// sent messages (nfnetlink_rcv_batch: the commit's error for the batch,
// then an acknowledgement per message). google/nftables reads one per
// message, so an acknowledgement was left queued and read by the next
// batch as its own first reply, each later batch's last reply by the one
// after: a batch the kernel refused could be reported applied, or one it
// applied reported failed. The trigger is real: an anonymous set no rule
// binds (QueueCommitFailure), which nf_tables_commit refuses with EINVAL.
// Whatever the first Apply reports (blame retries the batch without the
// set, which then applies), every later Apply must report what the kernel
// did.
func TestApplyAfterCommitFailure(t *testing.T) {
	t.Cleanup(pinhole.SetFlushDeadline(2 * time.Second))
	mk := func(port uint16) pinhole.Pinhole {
		p := everyShape[0]
		p.InternalPort, p.ExternalPort = port, port
		return p
	}
	taken := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}
	clash := taken
	clash.InternalAddr = c4b // same public port, another client: the kernel refuses
	open := everyShape[1]
	for _, tc := range []struct {
		name string
		// after the refused commit: ops, and whether the kernel takes them
		next    [][]pinhole.Op
		applied []bool
	}{
		{"then batches the kernel takes", [][]pinhole.Op{
			{install(mk(3001), time.Minute)},
			{install(mk(3002), time.Minute), install(mk(3003), time.Minute)},
		}, []bool{true, true}},
		{"then a batch the kernel refuses", [][]pinhole.Op{
			{del(open), install(clash, time.Minute), install(mk(3004), time.Minute)},
			{install(mk(3005), time.Minute)},
		}, []bool{false, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBackend(t, netlab.NewNS(t, "nftenomem"), pinhole.Config{})
			apply(t, b, install(taken, time.Minute), install(open, time.Minute))
			want := []pinhole.Pinhole{taken, open}

			first := []pinhole.Op{install(mk(3000), time.Minute)}
			before := pinhole.ConnOf(b)
			pinhole.QueueCommitFailure(b)
			err := b.Apply(first)
			t.Logf("Apply with a refused commit: %v", err)
			if pinhole.ConnOf(b) == before {
				t.Errorf("connection not replaced after a batch answered with more replies than messages")
			}
			if err == nil { // blame retried it without the unbound set
				want = append(want, mk(3000))
			}
			for i, ops := range tc.next {
				err := b.Apply(ops)
				if (err == nil) != tc.applied[i] {
					t.Errorf("Apply %d after the refused commit: %v; want applied %v", i+1, err, tc.applied[i])
				}
				if err == nil {
					for _, op := range ops {
						if op.Kind == pinhole.Install {
							want = append(want, op.Pinhole)
						}
					}
				}
			}
			slices.SortFunc(want, sortPinholes)
			got, _ := listPinholes(t, b)
			if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Errorf("kernel against what Apply reported (-want +got):\n%s", diff)
			}
		})
	}
}

// TestReadsAfterReadCutShort (h/nftenomem): a read on the Backend's
// connection that fails after its request went (here at once, on a past
// read deadline: CutReads) leaves the kernel's reply queued, and a dump
// running on the socket that queues its next part with each later read.
// google/nftables reads without checking sequence numbers, so the next
// request read that reply as its own: a read returned another set's
// elements, a batch took a dump part for its acknowledgement. Every use of
// the connection must first drop what no request of its own is owed.
func TestReadsAfterReadCutShort(t *testing.T) {
	prot := []netip.Prefix{netip.MustParsePrefix("2001:db8:77::/48"), netip.MustParsePrefix("10.77.0.0/16")}
	served := []netip.Addr{netip.MustParseAddr("2001:db8:1:2::1"), netip.MustParseAddr("10.100.0.1")}
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}
	for _, tc := range []struct {
		name string
		next string // what runs after the cut read
	}{
		{"then a read", "read"},
		{"then a batch", "batch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBackend(t, netlab.NewNS(t, "nftenomem"), pinhole.Config{})
			if err := b.SetProtected(prot); err != nil {
				t.Fatal(err)
			}
			if err := b.SetServed(served, nil); err != nil {
				t.Fatal(err)
			}
			restore := pinhole.CutReads(b)
			_, err := b.Protected()
			restore()
			if err == nil {
				t.Fatal("Protected with its reads cut: no error")
			}
			switch tc.next {
			case "read":
				got, err := b.Served()
				want := slices.Clone(served)
				slices.SortFunc(want, func(a, b netip.Addr) int { return a.Compare(b) })
				if err != nil || !slices.Equal(got, want) {
					t.Errorf("Served after a cut read: %v, %v; want %v", got, err, want)
				}
			case "batch":
				if err := b.Apply([]pinhole.Op{install(p, time.Minute)}); err != nil {
					t.Errorf("Apply after a cut read: %v", err)
				}
				got, _ := listPinholes(t, b)
				if diff := cmp.Diff([]pinhole.Pinhole{p}, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
					t.Errorf("kernel after the Apply (-want +got):\n%s", diff)
				}
			}
			got, err := b.Protected()
			if err != nil || len(got) != len(prot) {
				t.Errorf("Protected at the end: %v, %v; want %v", got, err, prot)
			}
		})
	}
}

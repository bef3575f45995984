package server

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	mnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// BenchmarkCtDumpCost (root; BENCHMARKS.md item 41): what one conntrack
// dump of the walk (ctDeleter.end) costs in a namespace whose table holds
// `flows` UDP flows, none of them matched: the kernel-filtered dump
// (CTA_FILTER, the walk's inbound and SNAT groups), the same dump
// unfiltered, and an exact-tuple GET (what a delete by a known tuple costs
// the kernel: one hash lookup). Every dump walks the kernel's global hash
// (nf_conntrack_buckets, reported as buckets) whatever the namespace holds.
func BenchmarkCtDumpCost(b *testing.B) {
	for _, flows := range []int{0, 4096, 65536} {
		b.Run(fmt.Sprintf("flows=%d", flows), func(b *testing.B) {
			ns := netlab.NewNS(b, "ctwalkb")
			d := ctDumpNS(b, ns, flows)
			nothing := []ctFilter{{v4: true, t: ctTarget{addr: netip.MustParseAddr("198.51.100.7"), proto: 17, port: 9}}}
			nat := []ctFilter{{v4: true, nat: true, src4: [4]byte{10, 9, 9, 9}, sport: 9, t: ctTarget{addr: netip.MustParseAddr("198.51.100.7"), proto: 17, port: 9}}}
			b.Run("filtered", func(b *testing.B) {
				ctDumpLoop(b, func() {
					if _, err := d.end(ctGroup{v4: true, proto: 17}, nothing); err != nil {
						b.Fatal(err)
					}
				})
			})
			// The churn bench's walk: IPv6 TCP, no address filter.
			v6 := []ctFilter{{t: ctTarget{addr: netip.MustParseAddr("2001:db8:1:4000::1"), proto: 6, port: 21000}}, {t: ctTarget{addr: netip.MustParseAddr("2001:db8:1:4000::2"), proto: 6, port: 21001}}}
			b.Run("filtered-v6", func(b *testing.B) {
				ctDumpLoop(b, func() {
					if _, err := d.end(ctGroup{proto: 6}, v6); err != nil {
						b.Fatal(err)
					}
				})
			})
			b.Run("filtered-snat", func(b *testing.B) {
				ctDumpLoop(b, func() {
					if _, err := d.end(ctGroup{v4: true, proto: 17, nat: true}, nat); err != nil {
						b.Fatal(err)
					}
				})
			})
			b.Run("unfiltered", func(b *testing.B) {
				var got int
				ctDumpLoop(b, func() {
					msgs, err := d.c.Execute(mnl.Message{
						Header: mnl.Header{Type: mnl.HeaderType(nfnlSubsysCtnetlink<<8 | ctMsgGet), Flags: mnl.Request | mnl.Dump},
						Data:   nfgen(unix.AF_INET),
					})
					if err != nil {
						b.Fatal(err)
					}
					got = len(msgs)
				})
				if got < flows {
					b.Fatalf("dumped %d flows, want ≥ %d", got, flows)
				}
			})
			b.Run("flush-mark", func(b *testing.B) {
				ctDumpLoop(b, func() { ctFlushMark(b, d) })
			})
			b.Run("get-tuple", func(b *testing.B) {
				orig := ctOrigTuple(ctDumpFlow(0))
				ctDumpLoop(b, func() {
					_, err := d.c.Execute(mnl.Message{
						Header: mnl.Header{Type: mnl.HeaderType(nfnlSubsysCtnetlink<<8 | ctMsgGet), Flags: mnl.Request | mnl.Acknowledge},
						Data:   append(nfgen(unix.AF_INET), orig...),
					})
					if flows > 0 && err != nil || flows == 0 && err == nil {
						b.Fatalf("get: %v", err)
					}
				})
			})
		})
	}
}

// BenchmarkCtDumpStall (root; item 41): what the walk's dumps do to the
// rest of the box: a UDP round trip over loopback in a namespace, and an
// nftables transaction (one element added, or one deleted),
// timed one after another, with no dump running, with the walk's
// filtered dump in a loop beside them, and with a kernel flush by mark. Reported: p50, p99 and max of one
// op (µs), and the dumps (or flushes) run meanwhile.
func BenchmarkCtDumpStall(b *testing.B) {
	ns := netlab.NewNS(b, "ctwalks")
	nothing := []ctFilter{{v4: true, t: ctTarget{addr: netip.MustParseAddr("198.51.100.7"), proto: 17, port: 9}}}
	echo, err := ns.StartUDPEcho("127.0.0.1:7007")
	if err != nil {
		b.Fatal(err)
	}
	defer echo.Close()
	var conn *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err := net.Dial("udp", "127.0.0.1:7007")
		conn, _ = c.(*net.UDPConn)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	rtt := func() {
		buf := make([]byte, 64)
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Write([]byte("x")); err != nil {
			b.Fatal(err)
		}
		if _, err := conn.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
	nc, err := ns.NftConn()
	if err != nil {
		b.Fatal(err)
	}
	tab := nc.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "ctwalk"})
	set := &nftables.Set{Table: tab, Name: "pins", KeyType: nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeInetService), Concatenation: true, HasTimeout: true}
	if err := nc.AddSet(set, nil); err != nil {
		b.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		b.Fatal(err)
	}
	var k uint16
	var added [][]byte
	nftAdd := func() {
		k++
		key := binary.BigEndian.AppendUint16([]byte{192, 0, 2, 1, 17, 0, 0, 0}, k)
		key = append(key, 0, 0)
		if err := nc.SetAddElements(set, []nftables.SetElement{{Key: key, Timeout: time.Hour}}); err != nil {
			b.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			b.Fatal(err)
		}
		added = append(added, key)
	}
	nftDel := func() {
		key := added[len(added)-1]
		added = added[:len(added)-1]
		if err := nc.SetDeleteElements(set, []nftables.SetElement{{Key: key}}); err != nil {
			b.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	for _, op := range []struct {
		name string
		fn   func()
	}{{"udp-rtt", rtt}, {"nft-add", nftAdd}, {"nft-del", nftDel}} {
		for _, beside := range []string{"none", "dump", "flush-mark"} {
			b.Run(fmt.Sprintf("%s/beside=%s", op.name, beside), func(b *testing.B) {
				stop := make(chan struct{})
				var wg sync.WaitGroup
				dumps := 0
				if beside != "none" {
					dd := ctDumpDial(b, ns)
					defer dd.close()
					wg.Add(1)
					go func() {
						defer wg.Done()
						for {
							select {
							case <-stop:
								return
							default:
							}
							if beside == "flush-mark" {
								ctFlushMark(b, dd)
							} else if _, err := dd.end(ctGroup{v4: true, proto: 17}, nothing); err != nil {
								b.Error(err)
								return
							}
							dumps++
						}
					}()
					time.Sleep(50 * time.Millisecond)
				}
				ts := make([]time.Duration, 0, b.N)
				b.ResetTimer()
				for range b.N {
					t0 := time.Now()
					op.fn()
					ts = append(ts, time.Since(t0))
					time.Sleep(time.Millisecond) // spread over the dumps
				}
				b.StopTimer()
				close(stop)
				wg.Wait()
				slices.Sort(ts)
				b.ReportMetric(float64(ts[len(ts)/2].Microseconds()), "p50-µs")
				b.ReportMetric(float64(ts[len(ts)*99/100].Microseconds()), "p99-µs")
				b.ReportMetric(float64(ts[len(ts)-1].Microseconds()), "max-µs")
				b.ReportMetric(float64(dumps), "dumps")
			})
		}
	}
}

// ctFlushMark has the kernel end the flows of a conntrack mark (none
// here): a delete without a tuple (ctnetlink_flush_conntrack), which walks
// the table in the kernel, no dump.
func ctFlushMark(b *testing.B, d *ctDeleter) {
	ae := mnl.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Uint32(8, 0x7e57)      // CTA_MARK
	ae.Uint32(21, 0xffffffff) // CTA_MARK_MASK
	attrs, err := ae.Encode()
	if err != nil {
		b.Fatal(err)
	}
	if _, err := d.c.Execute(mnl.Message{
		Header: mnl.Header{Type: mnl.HeaderType(nfnlSubsysCtnetlink<<8 | ctMsgDelete), Flags: mnl.Request | mnl.Acknowledge},
		Data:   append(nfgen(unix.AF_INET), attrs...),
	}); err != nil {
		b.Fatalf("flush by mark: %v", err)
	}
}

// ctDumpLoop times fn per op and reports the kernel's bucket count.
func ctDumpLoop(b *testing.B, fn func()) {
	b.ResetTimer()
	for range b.N {
		fn()
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1e3, "ms/dump")
	if s, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_buckets"); err == nil {
		var n int
		fmt.Sscan(strings.TrimSpace(string(s)), &n)
		b.ReportMetric(float64(n), "buckets")
	}
}

// ctDumpNS fills ns's conntrack table with flows UDP flows and returns a
// walk's conntrack socket in it.
func ctDumpNS(b *testing.B, ns *netlab.NS, flows int) *ctDeleter {
	h, err := ns.Handle()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		b.Fatal(err)
	}
	defer nh.Close()
	for i := range flows {
		if err := nh.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V4, ctDumpFlow(i)); err != nil {
			b.Fatalf("create flow %d: %v", i, err)
		}
	}
	return ctDumpDial(b, ns)
}

func ctDumpDial(b *testing.B, ns *netlab.NS) *ctDeleter {
	h, err := ns.Handle()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	d, err := dialConntrack(int(h))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(d.close)
	return d
}

// ctDumpFlow is the i-th flow: from a WAN remote to an external endpoint,
// DNAT-ed to a client (as a pinhole's).
func ctDumpFlow(i int) *netlink.ConntrackFlow {
	rem := net.IPv4(203, 0, 113, byte(i/60000)).To4()
	ext := net.IPv4(192, 0, 2, 1).To4()
	cli := net.IPv4(10, 1, byte(i>>8), byte(i)).To4()
	f := &netlink.ConntrackFlow{FamilyType: unix.AF_INET, TimeOut: 3600}
	f.Forward = netlink.IPTuple{Protocol: 17, SrcIP: rem, SrcPort: uint16(1024 + i%60000), DstIP: ext, DstPort: uint16(20000 + i%16)}
	f.Reverse = netlink.IPTuple{Protocol: 17, SrcIP: cli, SrcPort: uint16(20000 + i%16), DstIP: rem, DstPort: uint16(1024 + i%60000)}
	return f
}

// ctOrigTuple is f's CTA_TUPLE_ORIG attribute.
func ctOrigTuple(f *netlink.ConntrackFlow) []byte {
	ae := mnl.NewAttributeEncoder()
	ae.Nested(ctaTupleOrig, func(ae *mnl.AttributeEncoder) error {
		ae.Nested(ctaTupleIP, func(ae *mnl.AttributeEncoder) error {
			ae.Bytes(ctaIPv4Src, f.Forward.SrcIP.To4())
			ae.Bytes(ctaIPv4Dst, f.Forward.DstIP.To4())
			return nil
		})
		ae.Nested(ctaTupleProto, func(ae *mnl.AttributeEncoder) error {
			ae.Uint8(ctaProtoNum, f.Forward.Protocol)
			ae.Bytes(ctaProtoSrc, binary.BigEndian.AppendUint16(nil, f.Forward.SrcPort))
			ae.Bytes(ctaProtoDst, binary.BigEndian.AppendUint16(nil, f.Forward.DstPort))
			return nil
		})
		return nil
	})
	b, _ := ae.Encode()
	return b
}

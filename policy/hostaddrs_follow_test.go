package policy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// TestHostSetFollowsNotifications: Run (with its periodic read an hour
// away, so only notifications explain a read) reads the host's addresses
// once after subscribing, once for all the notifications queued together,
// and, when the subscription ends (netlink's ends at its first receive
// error: an overrun, ENOBUFS, means notifications were lost), once at
// once, then subscribes again and reads after it. A subscription that
// fails leaves the periodic read, which tries again. Without the
// coalescing, the queued burst is 64 reads; without the re-read and the
// new subscription, the change made before the end is never seen.
func TestHostSetFollowsNotifications(t *testing.T) {
	x := netip.MustParseAddr("2001:db8:77::1")
	var addrs atomic.Pointer[[]net.Addr]
	addrs.Store(&[]net.Addr{})
	events := make(chan string, 4*hostQueued) // "read", "subscribe", in order
	// sub is a fake subscription: end closes its channel, as netlink's
	// goroutine does at a receive error or once done closes its socket.
	type sub struct {
		ch  chan<- netlink.AddrUpdate
		end func()
	}
	subs := make(chan sub, 4)
	fail := atomic.Int32{} // subscriptions to fail
	var nsub atomic.Int32
	h := &HostSet{Every: time.Hour, Addrs: func() ([]net.Addr, error) {
		events <- "read"
		return *addrs.Load(), nil
	}}
	h.subscribe = func(ch chan<- netlink.AddrUpdate, done <-chan struct{}, _ func(error)) error {
		if fail.Add(-1) >= 0 {
			events <- "subscribe failed"
			return errors.New("injected")
		}
		events <- "subscribe"
		if nsub.Add(1) == 1 && cap(ch) >= hostQueued {
			for range hostQueued { // a burst, queued before Run takes any
				ch <- netlink.AddrUpdate{NewAddr: true}
			}
		}
		end := sync.OnceFunc(func() { close(ch) })
		go func() { <-done; end() }()
		subs <- sub{ch, end}
		return nil
	}
	expect := func(t *testing.T, what string, want ...string) {
		t.Helper()
		var got []string
		for len(got) < len(want) {
			select {
			case e := <-events:
				got = append(got, e)
			case <-time.After(2 * time.Second): // a bound, not a speed
				t.Fatalf("%s: %q, then nothing for 2 s; want %q", what, got, want)
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("%s: %q, want %q", what, got, want)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- h.Run(ctx) }()
	defer func() { cancel(); <-ran }()

	expect(t, "start", "subscribe", "read", "read") // the burst: one read
	s := <-subs
	addrs.Store(&[]net.Addr{&net.IPNet{IP: x.AsSlice(), Mask: net.CIDRMask(64, 128)}})
	s.end() // the subscription ends, as at ENOBUFS
	expect(t, "subscription ended", "read", "subscribe", "read")
	if !h.Contains(x) {
		t.Fatalf("%v not read after the subscription ended", x)
	}
	s = <-subs
	addrs.Store(&[]net.Addr{})
	s.ch <- netlink.AddrUpdate{LinkAddress: net.IPNet{IP: x.AsSlice(), Mask: net.CIDRMask(64, 128)}}
	expect(t, "one notification", "read")
	if h.Contains(x) {
		t.Fatalf("%v still held after its removal was notified", x)
	}

	t.Run("subscription fails", func(t *testing.T) {
		h2 := &HostSet{Every: 20 * time.Millisecond, Addrs: h.Addrs, subscribe: h.subscribe}
		fail.Store(1)
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan error, 1)
		go func() { ran <- h2.Run(ctx) }()
		defer func() { cancel(); <-ran }()
		// Read periodically, then subscribed again at the next period.
		expect(t, "failed subscription", "subscribe failed", "read", "subscribe", "read")
		(<-subs).ch <- netlink.AddrUpdate{}
		// The next read may be the notification's or a period's: both
		// follow the subscription.
		expect(t, "after subscribing again", "read")
	})
}

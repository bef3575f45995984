package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
)

// floor is the reference server: it answers every datagram with itself
// and does nothing else. What a PCP server achieves relative to it is
// what the PCP work costs; the rest is the kernel and the generator.
type floor struct {
	conns    []*net.UDPConn
	answered atomic.Uint64
}

// listenFloor opens one socket per address.
func listenFloor(addrs []netip.AddrPort) (*floor, error) {
	f := &floor{}
	for _, a := range addrs {
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(a))
		if err != nil {
			f.close()
			return nil, fmt.Errorf("pcpload: floor: listen %s: %w: %w", a, errSocket, err)
		}
		f.conns = append(f.conns, c)
	}
	return f, nil
}

func (f *floor) close() {
	for _, c := range f.conns {
		c.Close()
	}
}

// serve echoes with `readers` goroutines per socket (one per CPU by
// default, as a multi-threaded server would) until ctx ends.
func (f *floor) serve(ctx context.Context, readers int) {
	if readers < 1 {
		readers = runtime.GOMAXPROCS(0)
	}
	var wg sync.WaitGroup
	for _, c := range f.conns {
		for range readers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, 2048)
				for {
					n, from, err := c.ReadFromUDPAddrPort(buf)
					if err != nil {
						if errors.Is(err, net.ErrClosed) {
							return
						}
						continue
					}
					if _, err := c.WriteToUDPAddrPort(buf[:n], from); err == nil {
						f.answered.Add(1)
					}
				}
			}()
		}
	}
	<-ctx.Done()
	f.close()
	wg.Wait()
}

type addrPortList []netip.AddrPort

func (l *addrPortList) String() string { return fmt.Sprint(*l) }
func (l *addrPortList) Set(s string) error {
	a, err := netip.ParseAddrPort(s)
	if err != nil {
		return err
	}
	*l = append(*l, a)
	return nil
}

func cmdFloor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("pcpload floor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var addrs addrPortList
	fs.Var(&addrs, "listen", "`ADDR:PORT` to echo on (repeatable)")
	readers := fs.Int("readers", 0, "reader goroutines per socket (0 = GOMAXPROCS)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(addrs) == 0 {
		return fmt.Errorf("pcpload: floor: --listen is required: %w", errConfig)
	}
	f, err := listenFloor(addrs)
	if err != nil {
		return err
	}
	for _, c := range f.conns {
		// The bench driver waits for this line before loading.
		fmt.Fprintf(stdout, "floor: serving %s\n", c.LocalAddr())
	}
	f.serve(ctx, *readers)
	fmt.Fprintf(stdout, "floor: answered %d datagrams\n", f.answered.Load())
	return nil
}

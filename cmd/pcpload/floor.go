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
	"unsafe"

	"golang.org/x/sys/unix"
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
// default, as a multi-threaded server would) until ctx ends. batch > 1
// reads up to batch datagrams per recvmmsg and echoes them with one
// sendmmsg, as pcpd's socket readers do; 1 is a recvfrom and a sendto per
// datagram.
func (f *floor) serve(ctx context.Context, readers, batch int) {
	if readers < 1 {
		readers = runtime.GOMAXPROCS(0)
	}
	var wg sync.WaitGroup
	for _, c := range f.conns {
		for range readers {
			wg.Add(1)
			if batch > 1 {
				go func() {
					defer wg.Done()
					f.echoBatches(c, batch)
				}()
				continue
			}
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
	batch := fs.Int("batch", defaultFloorBatch, "datagrams per recvmmsg/sendmmsg (1: recvfrom/sendto per datagram)")
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
	f.serve(ctx, *readers, *batch)
	fmt.Fprintf(stdout, "floor: answered %d datagrams\n", f.answered.Load())
	return nil
}

// defaultFloorBatch: pcpd's readers batch (recvmmsg, sendmmsg), so the
// floor does too; measured on the bench machine, see echoBatches.
const defaultFloorBatch = 64

// echoBatches echoes every datagram of c back to its sender, up to batch
// per system call: the kernel's source address of each received datagram
// is the destination of its echo, so nothing is copied or decoded.
func (f *floor) echoBatches(c *net.UDPConn, batch int) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	hdrs := make([]unix.Mmsghdr, batch)
	iovs := make([]unix.Iovec, batch)
	names := make([]unix.RawSockaddrInet6, batch)
	bufs := make([]byte, batch*2048)
	for i := range hdrs {
		hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&names[i]))
		hdrs[i].Hdr.Iov = &iovs[i]
		hdrs[i].Hdr.SetIovlen(1)
		iovs[i].Base = &bufs[i*2048]
	}
	var (
		trap     uintptr
		off, cnt int
		r        int
		errno    unix.Errno
	)
	call := func(fd uintptr) bool {
		n, _, e := unix.Syscall6(trap, fd, uintptr(unsafe.Pointer(&hdrs[off])), uintptr(cnt), unix.MSG_DONTWAIT, 0, 0)
		if e == unix.EAGAIN || e == unix.EINTR {
			return false
		}
		r, errno = int(n), e
		return true
	}
	for {
		for i := range hdrs {
			hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
			iovs[i].SetLen(2048)
		}
		trap, off, cnt = unix.SYS_RECVMMSG, 0, batch
		if err := rc.Read(call); err != nil {
			return // closed
		}
		if errno != 0 {
			continue
		}
		n := r
		for i := range n {
			iovs[i].SetLen(int(hdrs[i].Len)) // echo what came; the name is the sender
		}
		trap = unix.SYS_SENDMMSG
		for off = 0; off < n; {
			cnt = n - off
			if err := rc.Write(call); err != nil {
				return
			}
			if errno != 0 {
				off++ // skip the datagram the kernel refused
				continue
			}
			f.answered.Add(uint64(r))
			off += max(r, 1)
		}
	}
}
